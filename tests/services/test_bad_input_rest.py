"""Bad input through the REST flow, on the live stack: a real Celery miner, a real trainer, real
Postgres and Redis, the real app. The fixture set is tests/bad_inputs.py, the same one the CLI test
(tests/test_bad_input.py) runs.

One module-scoped flow: register the folder (POST /datasets), change one file and delete another,
then a tiny pipeline job (POST /jobs: stage 1 on the trainer -> mining on the miner -> stage 3)
runs to success. The parametrised test reads each case's per-image record back (GET
/datasets/{id}/images, the proposal record for the box-filter cases); the others check that
the good photos got proposals and pairs, and that EXIF-rotated boxes and thumbnails are upright.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from sqlalchemy import select

from services.common.db import session_scope
from services.common.models import Proposal, ProposalStatus
from tests import bad_inputs as B
from tests.services import procs

API = "/api/v1"
TINY = {"preset": "tiny", "batch_size": 4}


@pytest.fixture(scope="module")
def flow(settings_env, tmp_path_factory):
    from fastapi.testclient import TestClient

    from services.api.main import create_app

    logs = tmp_path_factory.mktemp("badinput-logs")
    with procs.isolated_env(settings_env, tmp_path_factory.mktemp("badinput-env")) as env:
        folder = env.data_root / f"badinput-{uuid.uuid4().hex[:8]}"
        facts = B.make_folder(folder, tmp_path_factory.mktemp("outside-the-root"))
        headers = {"Authorization": f"Bearer {env.token}"}
        # Generous limits: on a loaded 2-core machine Celery's imports alone can take minutes, and
        # a shard's selective search more than the 120 s that the fast test timeouts give a task.
        miner = procs.start_miner(procs.service_env(env, ORL_VISIBILITY_TIMEOUT_S=900), logs,
                                  f"bad-miner-{uuid.uuid4().hex[:6]}", start_timeout_s=300)
        trainer = procs.start_trainer(procs.service_env(env), logs, "bad-trainer")
        try:
            with TestClient(create_app()) as client:
                r = client.post(f"{API}/datasets", json={"name": folder.name, "path": str(folder)}, headers=headers)
                ds = procs.registered(client, r, 900, [miner])["id"]  # the miner runs the register job
                registered = _images(client, ds)
                B.mutate_after_registration(folder)
                params = {"pretrain": TINY, "mine": {"roi_mode": "roi_align", "ss_max_side_px": 320},
                          "train": TINY}
                r = client.post(f"{API}/jobs", json={"kind": "pipeline", "dataset_id": ds, "params": params},
                                headers=headers)
                assert r.status_code == 202, r.text
                row = procs.wait_job(r.json()["id"], 1500, [miner, trainer])  # minutes when loaded
                assert row["status"] == "succeeded", row["error"]
                children = client.get(f"{API}/jobs", params={"parent_id": row["id"]}).json()["items"]
                kids = {j["kind"]: j for j in children}
                yield {"client": client, "dataset_id": ds, "facts": facts, "folder": folder, "kids": kids,
                       "registered": registered, "images": _images(client, ds)}
        finally:
            miner.stop()
            trainer.stop()
            B.cleanup(folder)


def _images(client, dataset_id: int) -> dict[str, dict]:
    r = client.get(f"{API}/datasets/{dataset_id}/images", params={"limit": 500})
    assert r.status_code == 200, r.text
    return {i["rel_path"]: i for i in r.json()["items"]}


def _proposal_status(image_id: int, params_key: str) -> ProposalStatus:
    with session_scope() as s:
        return s.execute(select(ProposalStatus).where(ProposalStatus.image_id == image_id,
                                                      ProposalStatus.params_key == params_key)).scalar_one()


def _boxes(image_id: int, params_key: str) -> np.ndarray:
    with session_scope() as s:
        rows = s.execute(select(Proposal.x1, Proposal.y1, Proposal.x2, Proposal.y2).where(
            Proposal.image_id == image_id, Proposal.params_key == params_key).order_by(Proposal.ord)).all()
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


@pytest.mark.parametrize("case", B.CASES, ids=[c.file for c in B.CASES])
def test_every_case_is_recorded_through_the_rest_flow(flow, case):
    if case.root_only_skip and B.running_as_root():
        pytest.skip("tests run as root, and chmod 000 does not stop root from reading; fifo.jpg covers an "
                    "entry that cannot be opened")
    img, at_registration = flow["images"][case.file], flow["registered"][case.file]
    key = flow["kids"]["mine"]["result"]["plan"]["params_key"]
    if case.when == "scan":  # decided at registration, from the directory entry and the header
        assert at_registration["status"] == case.status and case.reason in (at_registration["reason"] or "")
        assert img["status"] == case.status
    elif case.when == "mine":  # usable; the proposal record says that the box filter fell back
        assert img["status"] == "ok"
        st = _proposal_status(img["id"], key)
        assert st.ok and st.n_boxes == 1 and case.reason in st.reason
    else:  # truncated (stage 1 skipped it mid-epoch), changed, vanished: ok when registered
        assert at_registration["status"] == "ok"
        assert img["status"] == "failed" and case.reason in img["reason"]
    if case.status == "failed":  # left out of the mining job's pairs
        r = flow["client"].get(f"{API}/correspondences",
                               params={"job_id": flow["kids"]["mine"]["id"], "image_id": img["id"], "side": "either"})
        assert r.status_code == 200 and r.json()["items"] == []


def test_who_recorded_the_late_failures(flow):
    """Truncated and vanished files were first met by stage 1 (the trainer marked them); the
    changed one decoded there, and the miner refused it on its checksum."""
    imgs = flow["images"]
    assert imgs["truncated.jpg"]["reason"].startswith("skipped in stage 1 training: cannot decode image")
    assert imgs["vanished.jpg"]["reason"].startswith("skipped in stage 1 training: file not found")
    assert imgs["changed.jpg"]["reason"].startswith("file changed since it was registered")
    assert flow["kids"]["pretrain"]["result"]["summary"]["skipped_images"] == 2


def test_good_photos_got_proposals_and_pairs(flow):
    client, mine = flow["client"], flow["kids"]["mine"]
    key = mine["result"]["plan"]["params_key"]
    for f in flow["facts"]["good"] + [flow["facts"]["exif_reference"]]:
        img = flow["images"][f]
        assert img["status"] == "ok" and img["reason"] is None
        assert _proposal_status(img["id"], key).n_boxes > 1
        r = client.get(f"{API}/correspondences", params={"job_id": mine["id"], "image_id": img["id"]})
        assert r.status_code == 200 and r.json()["items"], f"{f} got no pairs"
    train = flow["kids"]["train"]
    assert train["status"] == "succeeded" and train["result"]["pairs"] == mine["result"]["pairs"] > 0


def test_exif_rotated_boxes_pairs_and_thumbnails_are_upright(flow):
    client, key = flow["client"], flow["kids"]["mine"]["result"]["plan"]["params_key"]
    (w, h) = flow["facts"]["upright_size"]
    rot, ref = flow["images"]["exif_rotated.jpg"], flow["images"]["exif_upright.png"]
    assert (rot["width"], rot["height"]) == (w, h) and w > h  # registered with its upright size
    boxes = _boxes(rot["id"], key)
    assert len(boxes) > 1 and np.array_equal(boxes, _boxes(ref["id"], key))  # same pixels, same boxes
    r = client.get(f"{API}/correspondences", params={"job_id": flow["kids"]["mine"]["id"], "image_id": rot["id"],
                                                     "side": "either", "limit": 500})
    pairs = r.json()["items"]
    assert pairs
    for p in pairs:
        box = p["query_box"] if p["image_id"] == rot["id"] else p["neighbor_box"]
        assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
    # Thumbnails and crops come from the upright pixels: equal to those of the upright copy.
    t_rot = client.get(f"{API}/images/{rot['id']}/thumbnail", params={"size": 128})
    t_ref = client.get(f"{API}/images/{ref['id']}/thumbnail", params={"size": 128})
    # Previews decode JPEGs at reduced DCT scale (draft mode), which is not exactly the same on
    # a rotated file and its upright copy: same size, pixels within a few levels.
    assert t_rot.status_code == 200 and _close_jpegs(t_rot.content, t_ref.content)
    box = ",".join(str(int(v)) for v in boxes[0])
    c_rot = client.get(f"{API}/images/{rot['id']}/crop", params={"box": box, "size": 64})
    c_ref = client.get(f"{API}/images/{ref['id']}/crop", params={"box": box, "size": 64})
    assert c_rot.status_code == 200 and _close_jpegs(c_rot.content, c_ref.content)


def _close_jpegs(a: bytes, b: bytes, tol: float = 4.0) -> bool:
    """Two JPEGs of one picture: same size and a mean absolute difference below ``tol`` levels."""
    import io

    from PIL import Image

    x, y = (np.asarray(Image.open(io.BytesIO(v)).convert("RGB"), dtype=np.float64) for v in (a, b))
    return x.shape == y.shape and float(np.abs(x - y).mean()) < tol
