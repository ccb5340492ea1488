"""The miners' keep-alive reads kombu's Redis layout (services/miner/keepalive.py): checked here
against real messages sent by Celery to a real Redis, and one taken by a real kombu consumer.

Which jobs count as waiting decides whether a healthy job is requeued (a message just taken by a
worker whose task has not sent its first heartbeat yet) or a dead worker's job is left running.
"""

from __future__ import annotations

import time
import uuid

import redis
from celery import Celery
from kombu import Connection

from services.miner.keepalive import waiting_job_ids

JOB = 987_654_321  # far above any job id another test creates in the shared database


def test_ready_and_freshly_taken_messages_count_old_taken_ones_do_not(settings_env):
    url = settings_env.broker_url
    queue = f"keepalive-{uuid.uuid4().hex[:8]}"  # no worker listens here: nobody else takes it
    sender = Celery("keepalive-test", broker=url)
    try:
        sender.send_task("miner.propose_shard", args=[JOB, [1, 2]], queue=queue)
        sender.send_task("trainer.something", args=[JOB + 1], queue=queue)  # not a miner task
        assert waiting_job_ids(url, [queue]) == {JOB}

        with Connection(url) as conn:
            channel = conn.channel()
            taken = [channel.basic_get(queue, no_ack=False) for _ in range(2)]
            assert all(m is not None for m in taken)
            # Taken: no longer ready, so only the delivery-age window can see it.
            assert JOB not in waiting_job_ids(url, [queue])
            assert JOB in waiting_job_ids(url, [queue], recent_s=30)
            assert JOB + 1 not in waiting_job_ids(url, [queue], recent_s=30)

            # Taken long ago (a worker that died with it): it no longer keeps the job alive.
            client = redis.Redis.from_url(url)
            try:
                for m in taken:
                    client.zadd("unacked_index", {m.delivery_tag: time.time() - 60})
                assert JOB not in waiting_job_ids(url, [queue], recent_s=30)
            finally:
                for m in taken:
                    m.ack()
                client.delete(queue)
                client.close()
    finally:
        sender.close()


def test_another_broker_counts_nothing():
    assert waiting_job_ids("amqp://guest@127.0.0.1//", ["cpu"], recent_s=10) == set()
