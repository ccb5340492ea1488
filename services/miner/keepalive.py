"""Keep mining jobs whose tasks wait in the broker from looking dead.

The stale-job reaper (``services.common.jobs.reap_stale``, run by trainers and miner workers)
requeues a running job whose heartbeat is older than ORL_LEASE_S, and fails it after
ORL_MAX_ATTEMPTS. A task heartbeats its job while it runs; but a mining job whose next shards
are queued behind another job's long GPU tasks sends no heartbeat while it waits, and would be
requeued and eventually failed although nothing is wrong. So every miner worker, every
lease / 3 seconds, renews the heartbeat of each running mine job that has messages in the ready
queues (``waiting_job_ids`` here, ``services.common.jobs.keep_alive`` writes).

Messages a worker has taken (unacked) count only while they are young (``recent_s``, the
lease): a task's own heartbeat starts a moment after the worker takes its message (a fresh pool
process, the job gate's queries), and on a busy machine that moment can outlast what is left of
the lease, which once requeued a healthy job. Older unacked messages do not count: those of a
live worker are covered by its task's heartbeat, and those of a dead worker must let the job go
stale, so the reaper re-sends it within two leases, not after the broker's visibility timeout.
Redis brokers only (the message layout is kombu's Redis transport); with another broker this
does nothing.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterable

log = logging.getLogger(__name__)

# kombu's Redis transport keeps a queue's messages of priority p > 0 under "<queue>\x06\x16<p>".
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def job_id_of(raw: bytes | str | dict) -> int | None:
    """The job id (first positional argument) of a ``miner.*`` task message (its JSON text, or
    the decoded dict kombu keeps for an unacked message), else None."""
    try:
        msg = raw if isinstance(raw, dict) else json.loads(raw)
        if not str(msg.get("headers", {}).get("task", "")).startswith("miner."):
            return None
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return int(args[0])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


# kombu's Redis transport: a taken message is kept in this hash (delivery tag -> JSON
# [message, exchange, routing key]) until acked, with its delivery time in the sorted set.
_UNACKED, _UNACKED_INDEX = "unacked", "unacked_index"


def waiting_job_ids(broker_url: str, queues: Iterable[str], recent_s: float = 0.0) -> set[int]:
    """Jobs with a miner message ready in ``queues``, or taken by a worker less than
    ``recent_s`` seconds ago."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return set()
    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        ids: set[int] = set()
        for q in queues:
            for suffix in _PRIORITY_SUFFIXES:
                for raw in client.lrange(q + suffix, 0, -1):
                    job_id = job_id_of(raw)
                    if job_id is not None:
                        ids.add(job_id)
        if recent_s > 0:
            # Delivery times are the broker client's time.time() on the worker's host.
            tags = client.zrangebyscore(_UNACKED_INDEX, time.time() - recent_s, "+inf")
            for entry in client.hmget(_UNACKED, tags) if tags else []:
                try:
                    job_id = job_id_of(json.loads(entry)[0]) if entry else None
                except (ValueError, IndexError, TypeError):
                    job_id = None
                if job_id is not None:
                    ids.add(job_id)
        return ids
    finally:
        client.close()
