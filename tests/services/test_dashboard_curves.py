"""The Jobs page's training curves (Streamlit AppTest against a live API on the test database):
a training job's loss, learning rate and label-free signals, read through GET /jobs/{id}/metrics."""

from __future__ import annotations

import uuid

import pytest

from tests.services import test_dashboard as dash
from tests.services.test_job_metrics import write_run

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

live_api = dash.live_api  # uvicorn on the test database; needs no seeded data


def _charts(at) -> list:
    return list(at.get("vega_lite_chart"))  # what st.line_chart renders as


def test_jobs_page_draws_a_chart_per_signal_of_a_training_job(live_api, settings_env, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from services.common.db import session_scope
    from services.common.models import Dataset, Job

    rel = f"jobs/curves-{uuid.uuid4().hex[:8]}"
    write_run(settings_env.artifacts_dir / rel)
    with session_scope() as s:
        ds = Dataset(name=f"curves-{uuid.uuid4().hex[:8]}", path=str(settings_env.images_dir))
        s.add(ds)
        s.flush()
        monitored = Job(kind="pretrain", dataset_id=ds.id, status="succeeded", params={}, result={"out_dir": rel})
        plain_rel = f"{rel}-plain"
        write_run(settings_env.artifacts_dir / plain_rel, monitored=())
        plain = Job(kind="train", dataset_id=ds.id, status="succeeded", params={}, result={"out_dir": plain_rel})
        queued = Job(kind="train", dataset_id=ds.id, status="queued", params={})
        s.add_all([monitored, plain, queued])
        s.flush()
        ids = {"dataset": ds.id, "monitored": monitored.id, "plain": plain.id, "queued": queued.id}
    monkeypatch.setenv("ORL_API_URL", live_api)
    at = dash.open_page(AppTest.from_file(str(dash.REPO / "dashboard" / "app.py"), default_timeout=60),
                        page="jobs", dataset=ids["dataset"])
    assert not _charts(at), "curves are fetched only when asked for"
    keys = {t.key for t in at.toggle}
    assert {f"curves_{ids['monitored']}", f"curves_{ids['plain']}"} <= keys
    assert f"curves_{ids['queued']}" not in keys  # nothing to draw before a trainer claims it
    at.toggle(key=f"curves_{ids['monitored']}").set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    captions = [c.value for c in at.caption]
    for title in ("loss", "learning rate", "view retrieval top-1", "effective rank"):
        assert f"{title} (by step)" in captions
    assert len(_charts(at)) == 4
    at.toggle(key=f"curves_{ids['plain']}").set_value(True).run()
    assert len(_charts(at)) == 6  # loss and lr of the second job, which logged no signals
    assert any("monitor_every_epochs" in c.value for c in at.caption)
