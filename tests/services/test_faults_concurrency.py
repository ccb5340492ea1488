"""Several workers of every kind at once on one dataset (issue 11): two miner-cpu and two
miner-gpu workers (the gpu queue's run on the CPU here, with ``--pool solo`` as in production),
and two trainers, all started before the jobs. Every image is processed once, every job runs
once and completes once.

"Processed once" is read from the workers themselves: each logs the image ids it ran selective
search on, embedded, and paired as queries (services/miner/pipeline.py), and across all logs
each id appears exactly once per step. The database is checked for duplicate rows as well (the
unique keys would hide a second write, the logs do not).

The broker's visibility timeout is a production-like 300 s here: a shard that outlives it is
redelivered while it still runs, by design (docs/SERVICES.md, ORL_VISIBILITY_TIMEOUT_S), which
would be work done twice that this test is not about.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter

import pytest
from sqlalchemy import func, select

from services.common import broker
from services.common.db import session_scope
from services.common.models import Artifact, Image, ImageEmbedding, Neighbor, ProposalStatus
from tests.services import procs, servers
from tests.services.reliability import record

pytestmark = pytest.mark.slow

N_IMAGES = 12  # shards of 3 (procs.service_env): four selective-search shards, four pair shards


@pytest.fixture(scope="module")
def env(settings_env, tmp_path_factory):
    with servers.private_broker_env(settings_env, tmp_path_factory.mktemp("concurrency-env")) as e:
        yield e


def _ids(logs: str, step: str) -> Counter:
    """Image ids per ``job N: <step> images [..]`` line of the miners' logs."""
    out: Counter = Counter()
    for m in re.finditer(rf"job \d+: {step} images \[([0-9, ]*)\]", logs):
        out.update(int(i) for i in m.group(1).split(",") if i.strip())
    return out


def test_many_workers_process_every_image_once_and_every_job_once(env, tmp_path):
    folder = env.data_root / f"many-{uuid.uuid4().hex[:8]}"
    procs.copy_photos(folder, N_IMAGES)
    ds = procs.register_dataset(folder)
    ckpt = procs.make_checkpoint(env.images_dir, env.artifacts_dir)
    e = procs.service_env(env, ORL_VISIBILITY_TIMEOUT_S=300)
    workers: list[procs.Proc] = []
    try:
        for name, queues, pool in (("cpu1", "cpu", "prefork"), ("cpu2", "cpu", "prefork"),
                                   ("gpu1", "gpu", "solo"), ("gpu2", "gpu", "solo")):
            workers.append(procs.start_miner(e, tmp_path, name, queues=queues, pool=pool))
        trainers = [procs.start_trainer(e, tmp_path, f"t{i}") for i in (1, 2)]
        workers += trainers
        # Submitted together: one mining job and two stage-1 trainings, all on the dataset.
        mine = procs.create_job("mine", ds, {"checkpoint_id": ckpt})
        broker.send_mine(mine)
        trains = [procs.create_job("pretrain", ds, {"preset": "tiny", "batch_size": 2, "epochs": 1, "seed": s})
                  for s in (0, 1)]
        rows = {j: procs.wait_job(j, 600, workers) for j in (mine, *trains)}
    finally:
        for w in workers:
            w.stop()
    for j, row in rows.items():
        assert row["status"] == "succeeded", (j, row["error"])
        assert row["attempts"] == 1, (j, row)  # never requeued, never run twice
        assert row["finished_at"] is not None and row["progress_done"] == row["progress_total"]

    miners = workers[:4]
    logs = "\n".join(w.log() for w in miners)
    with session_scope() as s:
        image_ids = sorted(s.scalars(select(Image.id).where(Image.dataset_id == ds, Image.status == "ok")))
        # One row per image and step (the unique keys make more impossible; count anyway).
        proposals = s.scalar(select(func.count()).select_from(ProposalStatus)
                             .where(ProposalStatus.image_id.in_(image_ids)))
        embeddings = s.scalar(select(func.count()).select_from(ImageEmbedding)
                              .where(ImageEmbedding.image_id.in_(image_ids), ImageEmbedding.checkpoint_id == ckpt))
        neighbor_rows = s.execute(select(Neighbor.image_id, func.count()).where(Neighbor.job_id == mine)
                                  .group_by(Neighbor.image_id)).all()
        artifacts = Counter(s.execute(select(Artifact.job_id, Artifact.kind)
                                      .where(Artifact.job_id.in_([mine, *trains]))).all())
    assert len(image_ids) == N_IMAGES
    assert proposals == embeddings == N_IMAGES
    knn_k = rows[mine]["result"]["plan"]["mine"]["knn_k"]
    assert sorted(i for i, _ in neighbor_rows) == image_ids
    assert {n for _, n in neighbor_rows} == {min(knn_k, N_IMAGES - 1)}
    # Each image went through each step exactly once, whichever worker took its shard.
    for step in ("selective search on", "embedded", "pairs of query"):
        counts = _ids(logs, step)
        assert sorted(counts) == image_ids and set(counts.values()) == {1}, (step, counts)
    pairs = procs.pair_set(mine)  # asserts no duplicate pair
    assert len(pairs) == rows[mine]["result"]["pairs"] > 0
    result = rows[mine]["result"]
    assert sorted(result["pairs_done"]) == list(range(len(result["pairs_shards"])))
    # Every job has its one result: one correspondence, one checkpoint and one backbone per training.
    assert artifacts == Counter({(mine, "correspondence"): 1, **{(t, k): 1 for t in trains
                                                                 for k in ("checkpoint", "backbone")}})
    # Each training claimed by exactly one trainer, once.
    claims = Counter(j for t in trainers for j in map(int, re.findall(r"job (\d+): pretrain stage", t.log())))
    assert claims == Counter(trains), claims
    shards_by_worker = {w.name: len(re.findall(r"Task miner\.\w+\[[^]]+\] succeeded", w.log())) for w in miners}
    record("concurrency", {"images": N_IMAGES, "pairs": len(pairs), "tasks_per_miner": shards_by_worker,
                           "trainings_per_trainer": {t.name: sum(1 for j in trains if f"job {j}: pretrain stage"
                                                                 in t.log()) for t in trainers}})
