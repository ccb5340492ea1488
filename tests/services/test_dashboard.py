"""The dashboard against a live API: Streamlit's AppTest for the logic, headless Chromium for
what a person sees.

A real uvicorn process serves the API on a free port over the session's test database
(``pg_url``). The data is registered through the API (a folder of real sample photos plus one
broken file) and completed with rows a mining job and two trainings would write (pairs and
checkpoints), so the pages have something to show without running the slow pipeline here;
tests/services/test_stack.py and `make demo` run the real thing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from dashboard.views.common import md_text
from tests.services import procs

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "images"
N_PHOTOS = 6
N_PAIRS = 25
# How long a started server may take to answer; raise it on a machine busy with other work.
START_TIMEOUT_S = float(os.environ.get("ORL_TEST_START_TIMEOUT_S", "60"))
SCREENSHOT = Path(os.environ.get("ORL_SCREENSHOT_DIR", REPO / ".state" / "screenshots")) / "pairs_page.png"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# -- pure logic (no server) -----------------------------------------------------------------------
def test_dashboard_talks_to_the_api_only():
    """dashboard -> API over HTTP: it imports neither the library nor the services."""
    import ast

    bad = []
    for f in (REPO / "dashboard").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad += [f"{f.relative_to(REPO)}: {n}" for n in names
                    if n.split(".")[0] in {"orl", "services", "sqlalchemy", "celery", "redis", "torch"}]
    assert not bad, bad


def test_url_state_round_trip_and_rejects_bad_values():
    from dashboard import urlstate

    q = {"page": "pairs", "dataset": "3", "job": "12", "min_score": "0.5", "per_page": "50", "cursor": "abc"}
    values = urlstate.parse("pairs", q)
    assert values == {"dataset": 3, "job": 12, "image": None, "min_score": 0.5, "max_score": None,
                      "min_area": None, "max_area": None, "order": "score_desc", "seed": 0, "todo": False,
                      "per_page": 50, "cursor": "abc"}
    assert urlstate.encode("pairs", values) == q
    review = {"page": "pairs", "order": "random", "seed": "7", "todo": "1", "max_area": "5000", "max_score": "0.9"}
    assert urlstate.encode("pairs", urlstate.parse("pairs", review)) == review
    odd = urlstate.parse("pairs", {"order": "best", "seed": "-3", "todo": "yes", "min_area": "-5"})
    assert (odd["order"], odd["seed"], odd["todo"], odd["min_area"]) == ("score_desc", 0, False, None)
    assert urlstate.with_filters(values, order="random")["cursor"] is None
    # Hand-edited links degrade to defaults instead of failing.
    bad = urlstate.parse("pairs", {"job": "-1", "min_score": "nan", "per_page": "7", "image": "x"})
    assert bad["job"] is None and bad["min_score"] is None and bad["per_page"] == 20 and bad["image"] is None
    assert urlstate.page_of({"page": "nope"}) == "jobs"
    # Defaults stay out of the URL; a changed filter drops the cursor, a page turn keeps filters.
    assert urlstate.encode("attention", {"opacity": 0.5, "image": 4}) == {"page": "attention", "image": "4"}
    assert urlstate.with_filters(values, min_score=0.7)["cursor"] is None
    assert urlstate.with_filters(values, cursor="def")["cursor"] == "def"
    img = urlstate.parse("image", {"image": "5", "nb": "7", "q": "  val2017/ ", "checkpoint": "0", "cursor": ""})
    assert img == {"dataset": None, "image": 5, "checkpoint": None, "nb": 7, "q": "val2017/", "cursor": None}
    assert urlstate.parse("image", {"q": "x" * 201})["q"] is None


def test_drawing_scales_boxes_and_blends():
    from PIL import Image

    from dashboard import drawing

    assert drawing.scale_box([100, 50, 300, 250], (640, 480), (320, 240)) == [50, 25, 150, 125]
    img = Image.new("RGB", (100, 80), (0, 0, 0))
    boxed = np.asarray(drawing.draw_box(img, [10, 10, 60, 50], (255, 0, 0)))
    assert (boxed[10:50, 10] == [255, 0, 0]).all(axis=1).any() and boxed[30, 30].tolist() == [0, 0, 0]
    heat = Image.new("RGB", (50, 40), (200, 100, 0))
    assert np.asarray(drawing.blend(img, heat, 0.0)).max() == 0
    assert np.asarray(drawing.blend(img, heat, 1.0))[0, 0].tolist() == [200, 100, 0]
    centres, counts = drawing.histogram([0.1, 0.2, 0.2, 0.9], bins=4)
    assert counts.sum() == 4 and len(centres) == 4
    assert drawing.pair_colour(0) == drawing.pair_colour(len(drawing.PAIR_COLOURS))
    # A pair's pictures in one row: widths and gaps add up, each centred on the tallest.
    row = drawing.side_by_side([Image.new("RGB", (30, 20), (255, 0, 0)), Image.new("RGB", (10, 40), (0, 0, 255))],
                               gap_px=5)
    assert row.size == (45, 40)
    px = np.asarray(row)
    assert px[20, 10].tolist() == [255, 0, 0] and px[5, 10].tolist() == [255, 255, 255]  # centred vertically
    assert px[20, 32].tolist() == [255, 255, 255] and px[0, 40].tolist() == [0, 0, 255]  # the gap, then the next
    with pytest.raises(ValueError, match="at least one"):
        drawing.side_by_side([])


def test_pair_caption_keeps_file_names_literal():
    from dashboard.views import pairs

    pair = {"id": 7, "job_id": 2, "score": 0.91234, "rank": 0, "neighbor_rank": 2, "image_id": 3,
            "neighbor_image_id": 5, "image_path": "a_b_c/*x*.jpg", "neighbor_path": "$1 [cat](y).jpg",
            "reviews": {"correct": 1, "wrong": 2}, "verdict": "wrong"}
    text = pairs._caption(4, pair)
    assert text.startswith("**#4** · score **0.912** · pair rank 1 ") and "neighbour rank 3" in text
    assert "pair id 7 · job 2 · reviews ✓ 1 · ✗ 2 · you: :red[✗ wrong]  \n" in text
    # A caption is Markdown: the names' "_", "*", "$" and "[" must not become emphasis, a formula or a link.
    assert "image 3 · a\\_b\\_c/\\*x\\*\\.jpg → neighbour 3 · image 5 · \\$1 \\[cat\\]\\(y\\)\\.jpg" in text
    assert "you:" not in pairs._caption(4, {**pair, "verdict": None})


def test_job_params_and_progress_text():
    from dashboard.views import jobs

    p = jobs.build_params("pipeline", "tiny", 5, extra={"mine": {"knn_k": 5}})
    assert p == {"pretrain": {"preset": "tiny", "epochs": 5}, "mine": {"preset": "tiny", "knn_k": 5},
                 "train": {"preset": "tiny", "epochs": 5}}
    assert jobs.build_params("mine", "cpu", None, checkpoint_id=7) == {"preset": "cpu", "checkpoint_id": 7}
    assert jobs.build_params("train", "tiny", 3, mine_job_id=4) == {"preset": "tiny", "epochs": 3, "mine_job_id": 4}
    # The dashboard's default sends no preset: the worker applies the one default rule.
    assert jobs.PRESETS[0] == jobs.DEFAULT
    assert jobs.build_params("pipeline", jobs.DEFAULT, None) == {"pretrain": {}, "mine": {}, "train": {}}
    assert jobs.build_params("mine", jobs.DEFAULT, None, checkpoint_id=7) == {"checkpoint_id": 7}
    with pytest.raises(ValueError, match="JSON object"):
        jobs.parse_extra("[1, 2]")
    frac, text = jobs.progress_text({"status": "running", "progress": {
        "done": 3, "total": 12, "stage": "pretrain", "epoch": 1, "loss": 0.51234, "eta_s": 75}})
    assert frac == 0.25 and "epoch 1" in text and "loss 0.5123" in text and "ETA 1 min 15 s" in text


# -- a live API with data ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


@contextmanager
def running_api(log_dir: Path, **extra_env: str) -> Iterator[str]:
    """uvicorn services.api.main:app on a free port over the test database, with ``extra_env``
    (e.g. ORL_API_READ_TOKEN); its base URL, and the process stopped on exit."""
    port = free_port()
    log = log_dir / f"api-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra_env}  # settings_env already exported ORL_*
    bin_dir = Path(sys.executable).parent
    proc = start([str(bin_dir / "uvicorn"), "services.api.main:app", "--host", "127.0.0.1", "--port", str(port)],
                 env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/readyz", START_TIMEOUT_S, proc, log)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def live_api(settings_env, tmp_path_factory):
    """The API on the test database (reads open); its base URL."""
    with running_api(tmp_path_factory.mktemp("logs")) as url:
        yield url


@pytest.fixture(scope="module")
def seeded(live_api, settings_env, tiny_byol_checkpoint, registrar):
    """A registered dataset (real photos + one broken file), a succeeded mine job with pairs and
    two checkpoints (stage byol and orl). Returns ids."""
    from sqlalchemy import select

    from services.common.db import session_scope
    from services.common.models import Artifact, Image, Job, Neighbor, RoiPair

    # Other modules (test_dashboard_map) reuse this module-scoped fixture, so each use needs its own
    # folder (and dataset name) within the session's data root.
    folder = Path(tempfile.mkdtemp(prefix=f"dashboard_{os.getpid()}_", dir=settings_env.data_root))
    photos = sorted(SAMPLE.rglob("*.jpg"))[:N_PHOTOS]
    for f in photos:
        shutil.copy(f, folder / f.name)
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    headers = {"Authorization": f"Bearer {settings_env.token}"}
    r = httpx.post(f"{live_api}/api/v1/datasets", json={"name": folder.name, "path": str(folder)}, headers=headers)
    ds = procs.registered(httpx, r, procs=[registrar], base=f"{live_api}/api/v1")
    assert ds["counts"]["images"] == N_PHOTOS + 1 and ds["counts"]["failed_images"] == 1

    ckpt_dir = settings_env.artifacts_dir / "dashboard"
    ckpt_dir.mkdir(exist_ok=True)
    shutil.copy(tiny_byol_checkpoint, ckpt_dir / "last.pt")
    rng = np.random.default_rng(0)
    with session_scope() as s:
        images = list(s.execute(select(Image).where(Image.dataset_id == ds["id"], Image.status == "ok")
                                .order_by(Image.id)).scalars())
        pretrain = Job(kind="pretrain", dataset_id=ds["id"], status="succeeded", params={"preset": "tiny"})
        mine = Job(kind="mine", dataset_id=ds["id"], status="succeeded", params={"preset": "tiny"},
                   progress_done=len(images), progress_total=len(images))
        s.add_all([pretrain, mine])
        s.flush()
        byol = Artifact(job_id=pretrain.id, dataset_id=ds["id"], kind="checkpoint", stage="byol",
                        path=str(ckpt_dir / "last.pt"), meta={"epoch": 1})
        orl = Artifact(job_id=pretrain.id, dataset_id=ds["id"], kind="checkpoint", stage="orl",
                       path="dashboard/last.pt", meta={"epoch": 1})  # relative to the artifacts dir
        s.add_all([byol, orl])
        pairs = []
        for i in range(N_PAIRS):
            q, n = images[i % len(images)], images[(i + 1 + i // len(images)) % len(images)]

            def box(im):
                w, h = im.width, im.height
                x1, y1 = rng.uniform(0, w * 0.5), rng.uniform(0, h * 0.5)
                return [x1, y1, x1 + rng.uniform(0.2, 0.5) * w, y1 + rng.uniform(0.2, 0.5) * h]

            qb, nb = box(q), box(n)
            pairs.append(RoiPair(job_id=mine.id, image_id=q.id, neighbor_image_id=n.id, neighbor_rank=0,
                                 rank=i // len(images), score=float(0.95 - 0.02 * i),
                                 qx1=qb[0], qy1=qb[1], qx2=qb[2], qy2=qb[3],
                                 nx1=nb[0], ny1=nb[1], nx2=nb[2], ny2=nb[3]))
        s.add_all(pairs)
        # The mining job's KNN: each photo's 3 next ones, nearest first.
        s.add_all([Neighbor(job_id=mine.id, image_id=im.id, rank=r, similarity=0.9 - 0.1 * r,
                            neighbor_image_id=images[(k + 1 + r) % len(images)].id)
                   for k, im in enumerate(images) for r in range(3)])
        s.flush()
        out = {"dataset": ds["id"], "mine": mine.id, "pretrain": pretrain.id, "byol": byol.id, "orl": orl.id,
               "images": [im.id for im in images], "token": settings_env.token}
    return out


@pytest.fixture
def app(live_api, seeded, monkeypatch):
    """An AppTest of dashboard/app.py talking to the live API, the write token typed into the
    sidebar as a user does (the dashboard ignores one in its environment)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ORL_API_URL", live_api)
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=60)
    at.session_state["api_token"] = seeded["token"]
    return at


def open_page(at, **query):
    for k, v in query.items():
        at.query_params[k] = str(v)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at) -> str:
    """The page's Markdown, captions and image captions (where the Pairs page puts each pair's text)."""
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption]
                     + [c for im in at.image for c in im.captions])


def review_form(at):
    """The Pairs page's review form in the sidebar: (✓ correct, ✗ wrong, Save reviews)."""
    keys = [w.key for w in at.sidebar.multiselect]
    correct = at.multiselect(key=next(k for k in keys if k.startswith("pairs_correct_")))
    wrong = at.multiselect(key=next(k for k in keys if k.startswith("pairs_wrong_")))
    return correct, wrong, next(b for b in at.sidebar.button if b.label == "Save reviews")


def qp(at) -> dict[str, str]:
    return {k: (v[0] if isinstance(v, list) else v) for k, v in at.query_params.items()}


def submit_and_get_job(at) -> dict:
    """Click the page's Submit button; the job it reports submitted, as the API has it."""
    at.button[[b.label for b in at.button].index("Submit")].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    msg = [s.value for s in at.success]
    assert msg and "submitted job" in msg[0]
    job_id = int(msg[0].split("#")[1].split()[0])
    return httpx.get(f"{os.environ['ORL_API_URL']}/api/v1/jobs/{job_id}").json()


# -- AppTest against the live API -------------------------------------------------------------------
def test_pairs_page_shows_pairs_pages_with_cursor_and_filters(app, seeded):
    at = open_page(app, page="pairs", dataset=seeded["dataset"], job=seeded["mine"], per_page=10)
    # 10 pairs, one picture each (two boxed thumbnails and two crops side by side), best score first,
    # all in one image element (the browser's cost grows with the number of elements).
    assert len(at.image) == 1 and len(at.image[0].captions) == 10
    assert [int(n) for n in re.findall(r"^\*\*#(\d+)\*\*", texts(at), re.M)] == list(range(1, 11))
    body = texts(at)
    assert "score **0.950**" in body and "score **0.770**" in body and "score **0.750**" not in body
    assert qp(at)["job"] == str(seeded["mine"]) and "cursor" not in qp(at)

    at.button(key="pairs_next").click().run()
    assert not at.exception
    assert "cursor" in qp(at), "the page position is in the URL"
    assert "score **0.750**" in texts(at) and "score **0.950**" not in texts(at)
    at.button(key="pairs_back").click().run()
    assert "cursor" not in qp(at) and "score **0.950**" in texts(at)

    # A filter change starts again from page one and is written to the URL.
    at.button(key="pairs_next").click().run()
    at.number_input(key="pairs_min_score").set_value(0.9).run()
    assert qp(at)["min_score"] == "0.9" and "cursor" not in qp(at)
    assert any(c.value.endswith("best score first · score ≥ 0.90") for c in at.caption), "the filters set are named"
    scores = [float(v) for v in re.findall(r"score \*\*([0-9.]+)\*\*", texts(at))]
    assert scores and min(scores) >= 0.9
    image_id = seeded["images"][0]
    at.number_input(key="pairs_image").set_value(image_id).run()
    assert qp(at)["image"] == str(image_id)
    queries = [re.search(r"query · image (\d+) ", c).group(1) for im in at.image for c in im.captions]
    assert queries and all(q == str(image_id) for q in queries), queries


def test_pairs_page_orders_samples_and_reviews(app, seeded):
    api = os.environ["ORL_API_URL"]
    at = open_page(app, page="pairs", dataset=seeded["dataset"], job=seeded["mine"], per_page=10)
    # One form in the sidebar reviews the whole page; without a reviewer name it cannot be used.
    assert review_form(at)[2].disabled and "Reviewer" in review_form(at)[2].help, "no reviewer name yet"
    assert not [w for w in at.number_input if w.key == "pairs_seed"], "a seed only for a random sample"
    # worst first; a random sample with its seed in the URL; a score ceiling
    at.selectbox(key="pairs_order").set_value("score_asc").run()
    scores = [float(v) for v in re.findall(r"score \*\*([0-9.]+)\*\*", texts(at))]
    assert scores[0] == 0.47 and scores == sorted(scores) and qp(at)["order"] == "score_asc"
    at.selectbox(key="pairs_order").set_value("random").run()
    at.number_input(key="pairs_seed").set_value(3).run()
    assert qp(at)["order"] == "random" and qp(at)["seed"] == "3"
    assert "random sample (seed 3)" in texts(at)
    sample = re.findall(r"pair id (\d+)", texts(at))
    at.run()
    assert re.findall(r"pair id (\d+)", texts(at)) == sample, "the same seed, the same sample"
    at.number_input(key="pairs_max_score").set_value(0.6).run()
    assert max(float(v) for v in re.findall(r"score \*\*([0-9.]+)\*\*", texts(at))) <= 0.6
    # a reviewer marks the first pair of the sample correct, then changes their mind
    at.text_input(key="reviewer").set_value("dora").run()
    first = int(re.findall(r"pair id (\d+)", texts(at))[0])
    correct, wrong, save = review_form(at)
    assert correct.options == [f"#{n}" for n in range(1, len(correct.options) + 1)] and not save.disabled
    correct.set_value([1])
    save.click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "you: :green[✓ correct]" in texts(at) and texts(at).count("you: ") == 1
    correct, wrong, save = review_form(at)
    assert correct.value == [1] and wrong.value == [], "the form starts from the saved verdicts"
    # in both lists: refused, nothing written
    wrong.set_value([1])
    save.click().run()
    assert any("both correct and wrong: #1" in e.value for e in at.error)
    correct, wrong, save = review_form(at)
    correct.set_value([])
    wrong.set_value([1])
    save.click().run()
    assert not at.error and "you: :red[✗ wrong]" in texts(at)
    got = httpx.get(f"{api}/api/v1/correspondences", params={"job_id": seeded["mine"], "reviewer": "dora",
                                                             "reviewed": True}).json()["items"]
    assert [(p["id"], p["verdict"], p["reviews"]) for p in got] == [(first, "wrong", {"correct": 0, "wrong": 1})]
    # taken out of both lists: the API cannot withdraw a verdict, so it is kept, and the page says so
    correct, wrong, save = review_form(at)
    wrong.set_value([])
    save.click().run()
    assert any("not withdrawn): #1" in t.value for t in at.toast) and "you: :red[✗ wrong]" in texts(at)
    # the pairs not yet reviewed by this reviewer
    at.checkbox(key="pairs_todo").check().run()
    assert qp(at)["todo"] == "1" and str(first) not in re.findall(r"pair id (\d+)", texts(at))
    # the name outlives a visit to another page
    at.radio(key="nav_page").set_value("dataset").run()
    at.radio(key="nav_page").set_value("pairs").run()
    assert not at.exception and at.text_input(key="reviewer").value == "dora"


def test_pairs_page_from_a_shared_link_and_a_bad_cursor(app, seeded):
    at = open_page(app, page="pairs", dataset=seeded["dataset"], job=seeded["mine"], per_page=10,
                   cursor="not-a-cursor", min_score="0.8")
    # The API refuses the cursor; the page says so and falls back to page one with the filters kept.
    assert any("cursor" in w.value for w in at.warning)
    assert "cursor" not in qp(at) and qp(at)["min_score"] == "0.8"
    assert "score **0.950**" in texts(at)
    assert at.number_input(key="pairs_min_score").value == 0.8


def test_jobs_page_lists_submits_and_cancels(app, seeded):
    at = open_page(app, page="jobs", dataset=seeded["dataset"])
    body = texts(at)
    assert f"#{seeded['mine']} mine" in body and "succeeded" in body
    # Submit a train job through the form, on the seeded pairs.
    at.radio(key="submit_kind").set_value("train").run()
    # Epochs default to what the preset is meant for.
    at.selectbox(key="submit_preset").set_value("cpu").run()
    assert at.number_input(key="submit_epochs_cpu").value == 30
    at.selectbox(key="submit_preset").set_value("tiny").run()
    assert at.selectbox(key="submit_minejob").value == seeded["mine"]
    # Inside a form a value is sent with the submit click, in the same run.
    at.number_input(key="submit_epochs_tiny").set_value(2)
    job = submit_and_get_job(at)
    job_id = job["id"]
    assert job["kind"] == "train" and job["params"] == {"preset": "tiny", "epochs": 2, "mine_job_id": seeded["mine"]}
    # The new job is listed (queued: no trainer runs here) with a cancel button that works.
    at.run()
    at.button(key=f"cancel_{job_id}").click().run()
    assert not at.exception
    assert httpx.get(f"{os.environ['ORL_API_URL']}/api/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_jobs_page_registers_a_folder_and_shows_the_registration(app, seeded, settings_env, registrar):
    """The form's POST answers at once (202); the registration job then lists and checksums the
    folder on the registrar worker, and the Dataset page shows the dataset's status."""
    folder = Path(tempfile.mkdtemp(prefix="dash_register_", dir=settings_env.data_root))
    for f in sorted(SAMPLE.rglob("*.jpg"))[:3]:
        shutil.copy(f, folder / f.name)
    at = open_page(app, page="jobs", dataset=seeded["dataset"])
    at.text_input(key="register_name").set_value(folder.name)
    at.text_input(key="register_path").set_value(str(folder))
    at.button[[b.label for b in at.button].index("Register")].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    msg = [m.value for m in at.success]
    assert msg and "registration job #" in msg[0], msg
    job_id = int(msg[0].split("registration job #")[1].split()[0])
    row = procs.wait_job(job_id, 600, [registrar])
    assert row["status"] == "succeeded" and row["result"]["added"] == 3
    ds_id = next(d["id"] for d in httpx.get(f"{os.environ['ORL_API_URL']}/api/v1/datasets?limit=500").json()["items"]
                 if d["name"] == folder.name)
    from streamlit.testing.v1 import AppTest

    at = open_page(AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=60), page="dataset",
                   dataset=ds_id)  # a new session: the one above keeps the Jobs page in its state
    assert f"{md_text(folder.name)} · {md_text(folder)} · ready" in texts(at)  # names escaped: Markdown


def test_jobs_page_shows_api_errors_without_token(live_api, seeded, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ORL_API_URL", live_api)
    monkeypatch.delenv("ORL_API_TOKEN", raising=False)
    at = open_page(AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=60),
                   page="jobs", dataset=seeded["dataset"])
    submit = at.button[[b.label for b in at.button].index("Submit")]
    assert submit.disabled, "read-only without a token"
    # A wrong API URL gives a clear message, not a traceback.
    monkeypatch.setenv("ORL_API_URL", f"http://127.0.0.1:{free_port()}")
    at2 = open_page(AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=60), page="jobs")
    assert any("API not ready" in e.value for e in at2.error)


def test_attention_page_compares_two_checkpoints(app, seeded):
    at = open_page(app, page="attention", dataset=seeded["dataset"])
    # Defaults: newest BYOL checkpoint left, newest ORL right.
    assert at.selectbox(key="attention_a").value == seeded["byol"]
    assert at.selectbox(key="attention_b").value == seeded["orl"]
    assert len(at.image) == 4  # two overlays, two colour bars
    captions = [c.value for c in at.caption]
    ranges = [c for c in captions if c.replace("-", "").replace(".", "").replace("e", "").isdigit()]
    assert len(ranges) == 2 and all(-1.01 <= float(v) <= 1.01 for v in ranges), captions  # vmin of each map
    assert any("raw value range" in c for c in captions)
    at.slider(key="attention_opacity").set_value(0.8).run()
    assert not at.exception and qp(at)["opacity"] == "0.8"
    assert qp(at)["a"] == str(seeded["byol"]) and qp(at)["image"] == str(seeded["images"][0])


def test_dataset_page_counts_histogram_and_failed_images(app, seeded):
    api = os.environ["ORL_API_URL"]
    pair = httpx.get(f"{api}/api/v1/correspondences", params={"job_id": seeded["mine"], "limit": 1}).json()["items"][0]
    r = httpx.put(f"{api}/api/v1/correspondences/{pair['id']}/review", json={"verdict": "correct", "reviewer": "eve"},
                  headers={"Authorization": f"Bearer {seeded['token']}"})
    assert r.status_code in (200, 201), r.text
    summary = httpx.get(f"{api}/api/v1/jobs/{seeded['mine']}/review-summary").json()
    at = open_page(app, page="dataset", dataset=seeded["dataset"])
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == str(N_PHOTOS + 1) and metrics["Unreadable"] == "1"
    assert metrics["RoI pairs"] == str(N_PAIRS)
    assert any(f"{N_PAIRS} pairs" in c.value for c in at.caption)
    assert at.get("vega_lite_chart"), "the score histogram is drawn"
    reviews = at.dataframe[0].value
    assert list(reviews["job"]) == [f"#{seeded['mine']}"] and reviews["pairs"][0] == N_PAIRS
    lo, hi = summary["interval"]
    assert reviews["precision [95% interval]"][0] == f"{summary['precision']:.3f} [{lo:.3f}, {hi:.3f}]"
    assert reviews["reviewed"][0] == summary["reviewed"] >= 1
    assert any("Wilson 95% interval" in c.value for c in at.caption)
    failed = at.dataframe[1].value
    assert list(failed["file"]) == ["broken.jpg"] and failed["reason"][0]


def test_image_page_gallery_search_neighbours_and_pairs(app, seeded):
    at = open_page(app, page="image", dataset=seeded["dataset"])
    assert len(at.image) == N_PHOTOS, "the gallery shows every readable photo (one page)"
    assert any(f"images 1–{N_PHOTOS} of {N_PHOTOS}" in c.value for c in at.caption)
    # Search by file name: one match, written to the URL; open it.
    target = seeded["images"][-1]
    name = httpx.get(f"{os.environ['ORL_API_URL']}/api/v1/images/{target}").json()["rel_path"]
    at.text_input(key="image_q").set_value(Path(name).stem.upper()).run()
    assert not at.exception and qp(at)["q"] == Path(name).stem.upper()
    # The caption is Markdown: the file name is escaped (its "_" and "." shown as they are).
    assert [c for im in at.image for c in im.captions] == [f"{target} · {md_text(name)}"]
    at.button(key=f"open_{target}").click().run()
    assert not at.exception and qp(at)["image"] == str(target)
    # The photo, its 3 neighbours with similarities, and the pairs with the nearest drawn both ways:
    # the last photo's nearest is the first one; they share one pair in each direction.
    captions = [c for im in at.image for c in im.captions]
    sims = [c for c in captions if "similarity" in c]
    assert len(sims) == 3 and sims[0].startswith("#1 · similarity 0.900") and "pairs → 1 ← 1" in sims[0], sims
    body = texts(at)
    assert f"image {target} as the query → neighbour {seeded['images'][0]}** · best 1 of 1 pairs" in body
    assert f"image {seeded['images'][0]} as the query → image {target} as its neighbour** · best 1 of 1" in body
    assert captions.count(f"image {target}") == 2 and captions.count(f"image {seeded['images'][0]}") == 2
    # Another neighbour: its pairs; the choice is in the URL.
    second = seeded["images"][1]
    at.button(key=f"nb_{second}").click().run()
    assert not at.exception and qp(at)["nb"] == str(second)
    assert f"neighbour #2 (image {second})" in "\n".join(h.value for h in at.subheader)
    # A checkpoint no mining job used: the API's 404 is shown as a hint, not an error.
    at.selectbox(key="image_checkpoint").set_value(seeded["byol"]).run()
    assert not at.exception and qp(at)["checkpoint"] == str(seeded["byol"])
    assert any("no stored neighbours under checkpoint" in i.value for i in at.info), [i.value for i in at.info]


def test_pairs_page_links_to_the_image_page(app, seeded):
    at = open_page(app, page="pairs", dataset=seeded["dataset"], job=seeded["mine"], per_page=10)
    # The sidebar's pair picker: "Only this image" narrows the page to that pair's query image.
    pick = next(s for s in at.sidebar.selectbox if (s.key or "").startswith("pairs_pick_"))
    assert pick.value == 1 and pick.options[0].startswith("#1 · image ")
    pick.set_value(2).run()
    at.button(key="pairs_only").click().run()
    second = seeded["images"][1]  # the seeded pairs' query images go in order, one pair each on this page
    assert qp(at)["image"] == str(second) and at.number_input(key="pairs_image").value == second
    at.number_input(key="pairs_image").set_value(None).run()
    assert "image" not in qp(at)
    # "Image page" opens the picked pair's query photo with its neighbours.
    at.button(key="pairs_imagepage").click().run()
    assert not at.exception
    assert qp(at)["page"] == "image" and qp(at)["image"] == str(seeded["images"][0])
    assert any("similarity" in c for im in at.image for c in im.captions)


def test_navigation_keeps_the_dataset_in_the_url(app, seeded):
    at = open_page(app, page="dataset", dataset=seeded["dataset"])
    at.radio(key="nav_page").set_value("pairs").run()
    assert not at.exception
    assert qp(at)["page"] == "pairs" and qp(at)["dataset"] == str(seeded["dataset"])
    assert sum(len(im.captions) for im in at.image) >= 4, "the pairs' pictures"


# -- a person's view: headless Chromium against the running dashboard -----------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@contextmanager
def running_dashboard(api_url: str, log_dir: Path, **extra_env: str) -> Iterator[str]:
    """``streamlit run dashboard/app.py`` on a free port, reading from ``api_url`` with ``extra_env``
    (e.g. ORL_API_READ_TOKEN); its base URL, and the process stopped on exit."""
    port = free_port()
    log = log_dir / f"dashboard-{port}.log"
    # Only reads here; the dashboard is never given the write token (docs/SERVICES.md, Security).
    env = {**{k: v for k, v in os.environ.items() if k != "ORL_API_TOKEN"}, "ORL_API_URL": api_url,
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false", "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none",
           "STREAMLIT_CLIENT_TOOLBAR_MODE": "viewer", **extra_env}
    bin_dir = Path(sys.executable).parent
    # The command of docs/SERVICES.md, on a free port.
    proc = start([str(bin_dir / "streamlit"), "run", "dashboard/app.py", "--server.port", str(port),
                  "--server.headless", "true"], env, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", START_TIMEOUT_S, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def live_dashboard(live_api, seeded, tmp_path_factory):
    with running_dashboard(live_api, tmp_path_factory.mktemp("logs")) as url:
        yield url


class WebDriver:
    """Just enough of the W3C WebDriver protocol, spoken to Debian's chromedriver over HTTP.

    httpx is all it takes (no Selenium and its dependency tree), and chromedriver is never
    downloaded: it is the one from the `chromium-driver` package, matching `chromium`.
    """

    def __init__(self, profile: Path, width: int = 1500, height: int = 1900):
        self.port = free_port()
        self.log = profile.with_suffix(".chromedriver.log")
        self.proc = start([CHROMEDRIVER, f"--port={self.port}"], dict(os.environ), self.log)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)
        wait_http(f"http://127.0.0.1:{self.port}/status", 30, self.proc, self.log)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        r = self.http.request(method, path, json=body)
        value = r.json().get("value")
        if r.status_code != 200:
            raise RuntimeError(f"webdriver {method} {path}: {value}")
        return value

    def get(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def script(self, js: str, *args):
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": js, "args": list(args)})

    def current_url(self) -> str:
        return self._call("GET", f"/session/{self.session}/url")

    def pointer(self, *actions: dict) -> None:
        """Mouse actions (W3C "pointer" input source), e.g. a move to viewport coordinates, a click."""
        self._call("POST", f"/session/{self.session}/actions", {"actions": [
            {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"}, "actions": list(actions)}]})

    def move_to(self, x: float, y: float) -> None:
        self.pointer({"type": "pointerMove", "duration": 100, "x": round(x), "y": round(y), "origin": "viewport"})

    def click(self) -> None:
        """A left click where the mouse is."""
        self.pointer({"type": "pointerDown", "button": 0}, {"type": "pointerUp", "button": 0})

    def screenshot_png(self) -> bytes:
        import base64

        return base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot"))

    def wait_for(self, predicate, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(0.5)

    def quit(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.http.close()
            stop(self.proc)


# The Embedding map's dots are SVG paths whose aria-label lists the point's fields (Vega writes
# it): the viewport centre of image arguments[0]'s dot, scrolled into view, or null.
MAP_POINT_JS = """
const dots = [...document.querySelectorAll('[data-testid="stVegaLiteChart"] path[role="graphics-symbol"]')];
const dot = dots.find(e => e.getAttribute('aria-label').includes('; id: ' + arguments[0] + ';'));
if (!dot) return null;
dot.scrollIntoView({block: 'nearest'});
const r = dot.getBoundingClientRect();
return [r.x + r.width / 2, r.y + r.height / 2];
"""
# The URL of the picture in Vega's tooltip once the browser decoded it, else null.
TOOLTIP_IMAGE_JS = """
const tip = document.getElementById('vg-tooltip-element');
const img = tip && tip.classList.contains('visible') ? tip.querySelector('img') : null;
return img && img.complete && img.naturalWidth > 0 ? img.src : null;
"""
# Only images the browser actually decoded (naturalWidth > 0) count as rendered.
LOADED_IMAGES_JS = ("return [...document.querySelectorAll('[data-testid=\"stImage\"] img')]"
                    ".filter(i => i.complete && i.naturalWidth > 0).map(i => i.src)")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_chromium_renders_the_pairs_page(live_dashboard, seeded, tmp_path):
    browser = WebDriver(tmp_path / "profile")
    try:
        url = f"{live_dashboard}/?page=pairs&dataset={seeded['dataset']}&job={seeded['mine']}&per_page=10"
        browser.get(url)
        # 10 pairs, one picture each (2 boxed thumbnails + 2 crops).
        srcs = browser.wait_for(lambda: (lambda s: s if len(s) >= 10 else None)(browser.script(LOADED_IMAGES_JS)),
                                90, "10 decoded pictures on the Pairs page")
        assert all("/media/" in s for s in srcs), srcs[:3]  # our PNG/JPEG bytes, served by Streamlit
        text = browser.script("return document.body.innerText")
        assert "score 0.950" in text and "Pairs" in text, text[:2000]
        # The view's state is in the URL, so this link reproduces it.
        assert f"job={seeded['mine']}" in browser.current_url()
        png = browser.screenshot_png()
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    finally:
        browser.quit()
