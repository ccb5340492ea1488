"""The storage layer against a real Postgres: migrations, idempotent writes, the job state machine."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, pool, select, text, update

from services.common import jobs
from services.common.datasets import PathRefused, resolve_dataset_path, scan_dataset
from services.common.db import insert_ignore, session_scope
from services.common.models import Artifact, Base, Dataset, Image, Job, Neighbor, RoiPair

REPO = Path(__file__).resolve().parents[2]


# -- settings -------------------------------------------------------------------------------------
def test_settings_are_read_on_first_use_not_at_import(monkeypatch):
    code = ("import os; import services.common.settings as s, services.common.db, services.api.main;"
            "assert s.get_settings.cache_info().currsize == 0;"
            "os.environ['ORL_SHARD_SIZE'] = '7'; assert s.get_settings().shard_size == 7")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "ORL_SHARD_SIZE": "1"})


def test_settings_parse_roots_and_normalise_url(monkeypatch, tmp_path):
    from services.common.settings import Settings

    monkeypatch.setenv("ORL_DATA_ROOTS", f"{tmp_path}/a:{tmp_path}/b:")
    monkeypatch.setenv("ORL_DATABASE_URL", "postgresql://u@h:5/db")
    s = Settings()
    assert s.data_root_paths == [tmp_path / "a", tmp_path / "b"]
    assert s.database_url == "postgresql+psycopg://u@h:5/db"
    monkeypatch.setenv("ORL_DATABASE_URL", "sqlite:///x.db")
    with pytest.raises(ValueError, match="Postgres"):
        Settings()


# -- migrations -----------------------------------------------------------------------------------
def test_migration_matches_models(pg_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    eng = create_engine(pg_url, poolclass=pool.NullPool)
    with eng.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        indexes = {r[0] for r in conn.execute(text("SELECT indexname FROM pg_indexes WHERE tablename='roi_pairs'"))}
    eng.dispose()
    assert diff == [], diff
    assert {"ix_roi_pairs_job_id_score_id", "ix_roi_pairs_image_id_score_id", "ix_roi_pairs_score_id"} <= indexes


def test_migrate_command_creates_database_and_is_repeatable(pg_url):
    from sqlalchemy import make_url

    from services.common.migrate import drop_database, head_revisions, is_at_head

    url = make_url(pg_url).set(database=f"orl_test_mig_{uuid.uuid4().hex[:8]}").render_as_string(hide_password=False)
    env = {**os.environ, "ORL_DATABASE_URL": url}
    try:
        for _ in range(2):  # second run: database exists, already at head
            out = subprocess.run([sys.executable, "-m", "services.common.migrate"], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            assert f"is at {', '.join(sorted(head_revisions()))}" in out.stdout
        eng = create_engine(url, poolclass=pool.NullPool)
        assert is_at_head(eng)
        eng.dispose()
    finally:
        drop_database(url)


def test_migrations_downgrade_and_upgrade_again(pg_url):
    """Each revision's downgrade undoes its upgrade: head -> 0001 drops pair_reviews, head again restores it."""
    from alembic import command
    from sqlalchemy import inspect, make_url

    from services.common.migrate import alembic_config, drop_database, is_at_head, upgrade

    url = make_url(pg_url).set(database=f"orl_test_down_{uuid.uuid4().hex[:8]}").render_as_string(hide_password=False)
    try:
        upgrade(url)
        eng = create_engine(url, poolclass=pool.NullPool)
        command.downgrade(alembic_config(url), "0001")
        assert "pair_reviews" not in inspect(eng).get_table_names() and not is_at_head(eng)
        command.upgrade(alembic_config(url), "head")
        assert "pair_reviews" in inspect(eng).get_table_names() and is_at_head(eng)
        eng.dispose()
    finally:
        drop_database(url)


def test_migration_0007_invalidates_the_embeddings_cached_by_checkpoint_alone(pg_url):
    """Rows from before the embed_key (options unknown) are deleted, not guessed a key; the
    downgrade deletes too, since rows of several keys would collide in the old primary key."""
    from alembic import command
    from sqlalchemy import inspect, make_url

    from services.common.migrate import alembic_config, create_database_if_missing, drop_database

    url = make_url(pg_url).set(database=f"orl_test_0007_{uuid.uuid4().hex[:8]}").render_as_string(hide_password=False)

    def one_embedding(conn, embed_key: str | None) -> None:
        ids = conn.execute(text(
            "WITH d AS (INSERT INTO datasets (name, path) VALUES (:name, '/d') RETURNING id), "
            "i AS (INSERT INTO images (dataset_id, rel_path) SELECT id, 'a.jpg' FROM d RETURNING id), "
            "a AS (INSERT INTO artifacts (kind, path) VALUES ('checkpoint', 'c.pt') RETURNING id) "
            "SELECT i.id, a.id FROM i, a"), {"name": uuid.uuid4().hex}).one()
        if embed_key is None:  # the schema before 0007
            conn.execute(text("INSERT INTO image_embeddings (image_id, checkpoint_id, vector) VALUES (:i, :c, :v)"),
                         {"i": ids[0], "c": ids[1], "v": b"\0" * 8})
        else:
            conn.execute(text("INSERT INTO image_embeddings (image_id, checkpoint_id, embed_key, vector) "
                              "VALUES (:i, :c, :k, :v)"), {"i": ids[0], "c": ids[1], "k": embed_key, "v": b"\0" * 8})

    def state(eng) -> tuple[int, list[str]]:
        with eng.connect() as conn:
            n = conn.execute(text("SELECT count(*) FROM image_embeddings")).scalar_one()
        return n, [c["name"] for c in inspect(eng).get_columns("image_embeddings")]

    try:
        create_database_if_missing(url)
        cfg = alembic_config(url)
        command.upgrade(cfg, "0006")
        eng = create_engine(url, poolclass=pool.NullPool)
        with eng.begin() as conn:
            one_embedding(conn, None)
        assert state(eng)[0] == 1
        command.upgrade(cfg, "0007")
        n, cols = state(eng)
        assert n == 0 and "embed_key" in cols
        with eng.begin() as conn:
            one_embedding(conn, "projector-0123456789ab")
        command.downgrade(cfg, "0006")
        n, cols = state(eng)
        assert n == 0 and "embed_key" not in cols
        eng.dispose()
    finally:
        drop_database(url)


# -- idempotent bulk writes -----------------------------------------------------------------------
def _dataset(s, path="/nonexistent") -> Dataset:
    ds = Dataset(name=f"ds-{uuid.uuid4().hex[:8]}", path=path)
    s.add(ds)
    s.flush()
    return ds


def test_insert_ignore_is_idempotent_and_chunks(settings_env):
    with session_scope() as s:
        ds = _dataset(s)
        rows = [dict(dataset_id=ds.id, rel_path=f"img{i:05d}.jpg", width=10, height=10, status="ok")
                for i in range(7000)]  # 7000 x 5 columns > one statement's bind limit: several chunks
        assert insert_ignore(s, Image, rows) == 7000
        assert insert_ignore(s, Image, rows) == 0
        assert insert_ignore(s, Image, rows[:10] + [dict(rows[0], rel_path="new.jpg")]) == 1
        assert s.execute(select(func.count()).where(Image.dataset_id == ds.id)).scalar_one() == 7001
        ids = [r[0] for r in s.execute(select(Image.id).where(Image.dataset_id == ds.id).order_by(Image.id).limit(3))]
        job = jobs.create_job(s, kind="mine", dataset_id=ds.id).job
        pair = dict(job_id=job.id, image_id=ids[0], neighbor_image_id=ids[1], neighbor_rank=0, rank=0, score=0.5,
                    qx1=0, qy1=0, qx2=1, qy2=1, nx1=0, ny1=0, nx2=1, ny2=1)
        assert insert_ignore(s, RoiPair, [pair]) == 1
        assert insert_ignore(s, RoiPair, [pair, dict(pair, score=0.9)]) == 0  # same unique key: ignored
        nb = dict(job_id=job.id, image_id=ids[0], rank=0, neighbor_image_id=ids[2], similarity=0.3)
        assert insert_ignore(s, Neighbor, [nb]) == 1 and insert_ignore(s, Neighbor, [nb]) == 0
        assert insert_ignore(s, Image, []) == 0


def test_scan_dataset_adds_only_new_images(settings_env, tmp_path):
    import shutil

    folder = settings_env.data_root / f"scan-{uuid.uuid4().hex[:6]}"
    shutil.copytree(settings_env.images_dir / "train2017", folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    with session_scope() as s:
        ds = _dataset(s, str(folder))
        r1 = scan_dataset(s, ds)
        assert (r1.found, r1.added, r1.added_failed) == (5, 5, 1)
        r2 = scan_dataset(s, ds)
        assert (r2.found, r2.added) == (5, 0)
        shutil.copy(settings_env.images_dir / "val2017" / sorted(os.listdir(settings_env.images_dir / "val2017"))[0],
                    folder / "extra.jpg")
        r3 = scan_dataset(s, ds)
        assert (r3.found, r3.added, r3.added_failed) == (6, 1, 0)
        bad = s.execute(select(Image).where(Image.dataset_id == ds.id, Image.status == "failed")).scalar_one()
        assert bad.rel_path == "broken.jpg" and "cannot read image header" in bad.reason
        ok = s.execute(select(Image).where(Image.dataset_id == ds.id, Image.rel_path == "extra.jpg")).scalar_one()
        assert ok.width > 0 and ok.height > 0 and len(ok.checksum) == 40 and ok.size_bytes > 0


# -- dataset paths --------------------------------------------------------------------------------
def test_dataset_paths_outside_roots_are_refused(tmp_path):
    root = (tmp_path / "root").resolve()
    (root / "ok" / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link_out").symlink_to(outside)
    (root / "link_in").symlink_to(root / "ok")
    (root / "file.jpg").write_bytes(b"x")
    roots = [root]
    assert resolve_dataset_path(str(root / "ok"), roots) == root / "ok"
    assert resolve_dataset_path("ok/sub", roots) == root / "ok" / "sub"  # relative to a root
    assert resolve_dataset_path(str(root / "link_in"), roots) == root / "ok"
    for bad, why in [(str(outside), "outside the data roots"), (str(root / "link_out"), "symlink"),
                     (f"{root}/ok/../../outside", "'..'"), (f"{root}/ok/%2e%2e/%2E%2E/outside", "'..'"),
                     (f"{root}/ok/%252e%252e/x", "'..'"), ("ok\\..\\..", "'..'"), ("", "empty"),
                     (str(root / "file.jpg"), "not a folder"), (str(root / "missing"), "not found"),
                     ("/etc", "outside"), ("ok\x00", "NUL")]:
        with pytest.raises(PathRefused, match=why):
            resolve_dataset_path(bad, roots)


# -- job state machine ----------------------------------------------------------------------------
def _new_dataset_id() -> int:
    with session_scope() as s:
        return _dataset(s).id


def test_idempotency_key_returns_the_same_job(settings_env):
    ds = _new_dataset_id()
    key = uuid.uuid4().hex
    with session_scope() as s:
        a = jobs.create_job(s, kind="train", dataset_id=ds, params={"epochs": 2}, idempotency_key=key)
    with session_scope() as s:
        b = jobs.create_job(s, kind="train", dataset_id=ds, params={"epochs": 2}, idempotency_key=key)
        assert (a.created, b.created, b.job.id, b.to_dispatch) == (True, False, a.job.id, [])
        with pytest.raises(jobs.IdempotencyConflict, match="different"):
            jobs.create_job(s, kind="train", dataset_id=ds, params={"epochs": 3}, idempotency_key=key)


def test_claim_skips_locked_rows_and_transitions_are_checked(settings_env):
    ds = _new_dataset_id()
    with session_scope() as s:
        ids = [jobs.create_job(s, kind="pretrain", dataset_id=ds).job.id for _ in range(2)]
        # Older queued jobs of other tests would be claimed first; take them out of the way.
        s.execute(update(Job).where(Job.status == "queued", Job.kind.in_(["pretrain", "train"]), Job.id.notin_(ids))
                  .values(status="cancelled"))
    from services.common.runtime import get_sessionmaker

    s1, s2 = get_sessionmaker()(), get_sessionmaker()()
    try:
        j1 = jobs.claim_job(s1, ["pretrain"], "w1")  # s1 still holds its row lock
        j2 = jobs.claim_job(s2, ["pretrain"], "w2")
        assert {j1.id, j2.id} == set(ids) and j1.status == j2.status == "running"
        assert jobs.claim_job(s2, ["pretrain"], "w2") is None
        s1.commit()
        s2.commit()
    finally:
        s1.close()
        s2.close()
    with session_scope() as s:
        job = jobs.get_job(s, j1.id)
        assert (job.worker, job.attempts) == ("w1", 1) and job.started_at is not None and job.heartbeat_at is not None
        assert jobs.heartbeat(s, j1.id, "w1", progress={"epoch": 1, "loss": 2.5}) is jobs.Lease.CONTINUE
        assert jobs.heartbeat(s, j1.id, "someone-else") is jobs.Lease.LOST
        assert jobs.set_progress(s, j1.id, total=10, add_done=3, progress={"step": 7}) == (3, 10)
        assert jobs.set_progress(s, j1.id, add_done=2) == (5, 10)
        s.flush()
        s.refresh(job)
        assert job.progress == {"epoch": 1, "loss": 2.5, "step": 7}
        with pytest.raises(jobs.InvalidTransition):
            jobs.finish_job(s, j1.id, "running")
        assert jobs.finish_job(s, j1.id, "succeeded", result={"checkpoint_id": None}) == []
        assert jobs.finish_job(s, j1.id, "succeeded") == []  # repeated report: no-op
        with pytest.raises(jobs.InvalidTransition, match="already finished"):
            jobs.finish_job(s, j1.id, "failed")
        with pytest.raises(jobs.InvalidTransition, match="only queued or running"):
            jobs.cancel_job(s, j1.id)
        assert jobs.get_job(s, j1.id).progress_done == 10 and jobs.heartbeat(s, j1.id) is jobs.Lease.LOST


def test_cancel_queued_and_running(settings_env):
    ds = _new_dataset_id()
    with session_scope() as s:
        q = jobs.create_job(s, kind="mine", dataset_id=ds).job
        r = jobs.create_job(s, kind="mine", dataset_id=ds).job
        assert jobs.start_job(s, r.id, "celery@x").status == "running"
        assert jobs.start_job(s, r.id, "celery@x").attempts == 1  # redelivered start: no new attempt
        assert jobs.cancel_job(s, q.id).status == "cancelled"
        assert jobs.start_job(s, q.id) is None  # the task that was already in the broker does nothing
        assert jobs.cancel_job(s, r.id).status == "cancelling"
        assert jobs.cancel_job(s, r.id).status == "cancelling"  # idempotent
        assert jobs.is_cancel_requested(s, r.id)
        assert jobs.heartbeat(s, r.id) is jobs.Lease.CANCEL
        jobs.finish_job(s, r.id, "failed")  # a cancelling job that stops without an error is cancelled
        assert jobs.get_job(s, r.id).status == "cancelled"


def _age_heartbeat(s, job_id: int, seconds: int) -> None:
    s.execute(update(Job).where(Job.id == job_id)
              .values(heartbeat_at=func.now() - text(f"interval '{seconds} seconds'")))


def test_stale_jobs_are_requeued_then_failed_after_three_attempts(settings_env):
    ds = _new_dataset_id()
    with session_scope() as s:
        job_id = jobs.create_job(s, kind="train", dataset_id=ds).job.id
        other = jobs.create_job(s, kind="mine", dataset_id=ds).job.id
        jobs.start_job(s, other, "celery@y")
        jobs.cancel_job(s, other)
    for attempt in (1, 2, 3):
        with session_scope() as s:
            jobs.start_job(s, job_id, f"w{attempt}")  # queued -> running, attempts + 1
            assert jobs.reap_stale(s, lease_s=60) == []  # fresh heartbeat: not stale
            _age_heartbeat(s, job_id, 120)
            _age_heartbeat(s, other, 120)
        with session_scope() as s:
            requeued = jobs.reap_stale(s, lease_s=60, max_attempts=3)
            job = jobs.get_job(s, job_id)
            if attempt < 3:
                assert (job_id, "train") in requeued
                assert (job.status, job.worker, job.attempts) == ("queued", None, attempt)
            else:
                assert requeued == [] and job.status == "failed"
                assert "stopped sending heartbeats" in job.error and "giving up after 3" in job.error
            assert jobs.get_job(s, other).status == "cancelled"  # a stale cancelling job just ends


def test_pipeline_runs_its_stages_in_order(settings_env):
    ds = _new_dataset_id()
    with session_scope() as s:
        ckpt = Artifact(kind="checkpoint", stage="byol", path="x.pt", dataset_id=ds)
        s.add(ckpt)
        s.flush()
        ckpt_id = ckpt.id
        c = jobs.create_job(s, kind="pipeline", dataset_id=ds,
                            params={"pretrain": {"epochs": 1}, "mine": {"k": 3}, "train": {"epochs": 2}})
        parent = c.job
        assert parent.status == "running" and parent.progress_total == 3
        (pre_id, kind), = c.to_dispatch
        assert kind == "pretrain" and jobs.get_job(s, pre_id).params == {"epochs": 1}
    with session_scope() as s:
        jobs.start_job(s, pre_id, "trainer@a")
        nxt = jobs.finish_job(s, pre_id, "succeeded", result={"checkpoint_id": ckpt_id})
        assert [k for _, k in nxt] == ["mine"]
        mine = jobs.get_job(s, nxt[0][0])
        assert mine.params == {"k": 3, "checkpoint_id": ckpt_id} and mine.parent_id == parent.id
        assert jobs.finish_job(s, pre_id, "succeeded") == []  # reported twice: one mine stage
    with session_scope() as s:
        jobs.start_job(s, mine.id)
        nxt = jobs.finish_job(s, mine.id, "succeeded", result={"pairs": 5})
        train = jobs.get_job(s, nxt[0][0])
        assert train.kind == "train" and train.params["mine_job_id"] == mine.id and train.params["epochs"] == 2
        p = jobs.get_job(s, parent.id)
        assert (p.status, p.progress_done, p.progress["stage"]) == ("running", 2, "train")
    with session_scope() as s:
        jobs.claim_job(s, ["train"], "trainer@b")
        jobs.finish_job(s, train.id, "succeeded", result={"checkpoint_id": 99})
        p = jobs.get_job(s, parent.id)
        assert p.status == "succeeded" and p.finished_at is not None
        assert p.result["stages"] == {"pretrain": pre_id, "mine": mine.id, "train": train.id}


def test_pipeline_fails_and_cancels_with_its_stages(settings_env):
    ds = _new_dataset_id()
    with session_scope() as s:
        a = jobs.create_job(s, kind="pipeline", dataset_id=ds)
        b = jobs.create_job(s, kind="pipeline", dataset_id=ds)
        c = jobs.create_job(s, kind="pipeline", dataset_id=ds)
        a_pre, b_pre, c_pre = a.to_dispatch[0][0], b.to_dispatch[0][0], c.to_dispatch[0][0]
        jobs.start_job(s, a_pre, "t")
        jobs.finish_job(s, a_pre, "failed", error="CUDA out of memory")
        pa = jobs.get_job(s, a.job.id)
        assert pa.status == "failed" and "stage pretrain" in pa.error and "CUDA out of memory" in pa.error
        # cancel a pipeline whose stage is still queued: both end at once
        assert jobs.cancel_job(s, b.job.id).status == "cancelled"
        assert jobs.get_job(s, b_pre).status == "cancelled"
        # cancel a pipeline whose stage runs: cancelling until the worker stops
        jobs.start_job(s, c_pre, "t")
        assert jobs.cancel_job(s, c.job.id).status == "cancelling"
        assert jobs.heartbeat(s, c_pre, "t") is jobs.Lease.CANCEL
        jobs.finish_job(s, c_pre, "cancelled")
        assert jobs.get_job(s, c.job.id).status == "cancelled"
        # a pretrain stage that reports no checkpoint fails the pipeline with a clear reason
        d = jobs.create_job(s, kind="pipeline", dataset_id=ds)
        d_pre = d.to_dispatch[0][0]
        jobs.start_job(s, d_pre, "t")
        assert jobs.finish_job(s, d_pre, "succeeded", result={}) == []
        assert "without result.checkpoint_id" in jobs.get_job(s, d.job.id).error


def test_concurrent_posts_with_one_idempotency_key_make_one_job(settings_env):
    from concurrent.futures import ThreadPoolExecutor

    ds = _new_dataset_id()
    key = uuid.uuid4().hex

    def submit(_):
        with session_scope() as s:
            c = jobs.create_job(s, kind="pretrain", dataset_id=ds, params={"epochs": 1}, idempotency_key=key)
            return c.job.id, c.created

    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(submit, range(8)))
    assert len({i for i, _ in got}) == 1 and sum(created for _, created in got) == 1


def test_api_and_common_import_no_other_service():
    """Services talk through the database and the broker (tasks sent by name), never by import."""
    bad = []
    for pkg in ("services/common", "services/api"):
        for f in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                bad += [f"{f.relative_to(REPO)}: {m}" for m in mods
                        if m.startswith(("services.miner", "services.trainer", "dashboard"))]
                if pkg == "services/common":
                    bad += [f"{f.relative_to(REPO)}: {m}" for m in mods if m.startswith("services.api")]
    assert not bad, bad


def _service_imports(path: Path) -> set[str]:
    """The services.* modules a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # "from services.common import jobs" names the module services.common.jobs
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("services.")}


def test_common_modules_import_one_way():
    """settings is a leaf, and no chain of imports in services/common comes back to where it started."""
    files = {f"services.common.{f.stem}": f for f in (REPO / "services" / "common").glob("*.py")
             if f.stem != "__init__"}
    graph = {m: {d for d in _service_imports(f) if d in files and d != m} for m, f in files.items()}
    assert graph["services.common.settings"] == set()
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, " -> ".join((*path, m))
        if m not in done:
            for d in graph[m]:
                visit(d, (*path, m))
            done.add(m)

    for m in graph:
        visit(m, ())


# Columns only a job row has; "status", "error" and "params" are left out (other tables have them too).
_JOB_COLUMNS = {"result", "progress", "progress_done", "progress_total", "heartbeat_at", "attempts", "worker",
                "cancel_requested", "started_at", "finished_at"}


def test_job_rows_have_one_writer():
    """Only services/common/jobs.py changes job rows: no attribute assignment or UPDATE elsewhere."""
    bad = []
    for pkg in ("services", "scripts", "dashboard"):
        for f in (REPO / pkg).rglob("*.py"):
            if f == REPO / "services" / "common" / "jobs.py":
                continue
            for node in ast.walk(ast.parse(f.read_text())):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                for t in targets:
                    for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                        if (isinstance(el, ast.Attribute) and el.attr in _JOB_COLUMNS
                                and getattr(el.value, "id", None) != "self"):  # a worker's own fields
                            bad.append(f"{f.relative_to(REPO)}:{node.lineno} sets .{el.attr}")
                if (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("update", "insert", "pg_insert")
                        and node.args and getattr(node.args[0], "id", None) == "Job"):
                    bad.append(f"{f.relative_to(REPO)}:{node.lineno} {node.func.id}(Job)")
    assert not bad, bad


def test_worker_writes_merge_and_respect_the_phase(settings_env):
    ds = _new_dataset_id()
    with session_scope() as s:
        job_id = jobs.create_job(s, kind="mine", dataset_id=ds).job.id
        idle = jobs.create_job(s, kind="mine", dataset_id=ds).job.id  # queued: keep_alive leaves it alone
        jobs.start_job(s, job_id, "miner@a")
        _age_heartbeat(s, job_id, 120)
    with session_scope() as s:
        job = jobs.get_job(s, job_id, lock=True)
        jobs.update_job(s, job, result={"plan": {"k": 1}, "phase": "propose"}, progress={"stage": "propose"},
                        total=8, beat=True)
        jobs.update_job(s, job, result={"phase": "embed"}, progress={"note": "x"}, done=3)
    with session_scope() as s:
        job = jobs.get_job(s, job_id)
        assert job.result == {"plan": {"k": 1}, "phase": "embed"}
        assert job.progress == {"stage": "propose", "note": "x"} and (job.progress_done, job.progress_total) == (3, 8)
        age = s.execute(select(func.now() - Job.heartbeat_at).where(Job.id == job_id)).scalar_one()
        assert age.total_seconds() < 60
        # a late report of the phase the job has left changes nothing
        assert jobs.set_progress(s, job_id, done=7, total=9, phase="propose") is None
        assert jobs.set_progress(s, job_id, done=5, total=8, phase="embed") == (5, 8)
        s.flush()
        s.refresh(job)
        assert job.progress["stage"] == "embed" and job.progress_done == 5
        _age_heartbeat(s, job_id, 120)
        assert jobs.keep_alive(s, {job_id, idle}) == 1
        assert jobs.keep_alive(s, set()) == 0
        assert jobs.reap_stale(s, lease_s=60) == []  # renewed: not stale
