"""Keep mining jobs whose tasks wait in the broker from looking dead.

The stale-job reaper (``services.common.jobs.reap_stale``, run by trainers and miner workers)
requeues a running job whose heartbeat is older than ORL_LEASE_S, and fails it after
ORL_MAX_ATTEMPTS. A task heartbeats its job while it runs; but a mining job whose next shards
are queued behind another job's long GPU tasks sends no heartbeat while it waits, and would be
requeued and eventually failed although nothing is wrong. So every miner worker, every
lease / 3 seconds, renews the heartbeat of each running mine job that has messages in the ready
queues (``waiting_job_ids`` here, ``services.common.jobs.keep_alive`` writes).

Only ready queues count, not messages a worker has taken (unacked): those of a live worker are
covered by its task's heartbeat, and those of a dead worker must let the job go stale, so the
reaper re-sends it without waiting for the broker's visibility timeout.
Redis brokers only (the message layout is kombu's Redis transport); with another broker this
does nothing.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

# kombu's Redis transport keeps a queue's messages of priority p > 0 under "<queue>\x06\x16<p>".
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def job_id_of(raw: bytes | str) -> int | None:
    """The job id (first positional argument) of a queued ``miner.*`` task message, else None."""
    try:
        msg = json.loads(raw)
        if not str(msg.get("headers", {}).get("task", "")).startswith("miner."):
            return None
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return int(args[0])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def waiting_job_ids(broker_url: str, queues: Iterable[str]) -> set[int]:
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
        return ids
    finally:
        client.close()

