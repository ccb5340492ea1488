#!/usr/bin/env python
"""Screenshots of every dashboard page (docs/screenshots/*.png), on a live stack with real pairs.

    nice -n 15 python scripts/screenshots.py [--out docs/screenshots] [--state .state/screenshots] [--keep]

1. Starts a fresh stack (scripts/stack.py in its own state folder, emptied first: a new embedded
   PostgreSQL, Redis, the API, the two miner workers and the dashboard; no trainer).
2. Registers the study's 490 photos (``../shared/data``: coco128 and coco-mini) through the API.
3. Imports the long study's stage 1 as it was mined: the checkpoint after 3,008 steps
   (benchmarks/results/study_long_keep/s0/e188.pt) and its mining
   (``mine_e188.json``, the authors' json layout: image KNN, similarities, RoI pairs and scores)
   become a pretrain job with that checkpoint and a mine job with its neighbours and pairs, the
   rows a mining job writes. The json names photos by their path in the study's symlink folder
   (``coco128/train2017/x.jpg``); they are matched to the registered images by file name (unique
   across the two sets). A random-init network of the same configuration is added as a second
   checkpoint, so the Attention page has a contrast (no stage-3 checkpoint is kept in the repo).
4. Reviews a random sample of pairs through the API with the ground-truth labels standing in for
   a person (reviewer ``coco-labels``: a pair is correct when both boxes overlap an object of one
   class by IoA >= 0.5, the study's rule), so the Dataset page shows a reviewed precision.
5. Runs a real embedding_map job (UMAP, or PCA without umap-learn) of the checkpoint through the
   API and the miner workers, coloured by each photo's COCO supercategory (the class covering the
   most box area; a CSV the script writes from the labels).
6. Opens each page in headless Chromium (Debian's chromium + chromium-driver, driven over
   WebDriver as in tests/services/test_dashboard.py) at a fixed window size, waits until its
   images are decoded and Streamlit has finished running, and saves a palette PNG.

Then it stops the stack (``--keep`` leaves it running, to look around).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import demo_stack  # noqa: E402  (scripts/demo_stack.py)
import stack  # noqa: E402  (scripts/stack.py)

KEEP = REPO / "benchmarks" / "results" / "study_long_keep" / "s0"
CHECKPOINT = KEEP / "e188.pt"
MINING = KEEP / "mine_e188.json"
DATA = REPO.parent / "shared" / "data"
DATASET_NAME = "coco128 and coco-mini"
PARAMS_KEY = "study_long_s0_e188"  # the imported boxes' selective-search parameters key
REVIEWER = "coco-labels"
REVIEW_SAMPLE = 60  # pairs judged by the labels (both photos labelled)
WINDOW = (1440, 1400)  # CSS pixels of the browser window; every screenshot has this size
MAX_PNG_BYTES = 400_000


# -- 2. + 3. data ---------------------------------------------------------------------------------------
def register(api: demo_stack.Api, data: Path, expected: int) -> dict:
    # POST /datasets answers at once; a registration job on a miner CPU worker scans the folder.
    posted = api.call("POST", "/api/v1/datasets", {"name": DATASET_NAME, "path": str(data)})
    ds = demo_stack.wait_registered(api, posted, timeout_s=600)
    counts = ds.get("counts") or {}
    if counts.get("images") != expected or counts.get("failed_images"):
        raise SystemExit(f"{data}: registered {counts} but the study mined {expected} photos; "
                         "is --data the folder holding coco128/ and coco-mini/ (and nothing else)?")
    return ds


def random_init_checkpoint(src: Path, dest: Path) -> None:
    """A network of ``src``'s configuration at initialisation (seed 0), in the same format."""
    import torch

    from orl.checkpoint import load_checkpoint, save_checkpoint
    from orl.config import Config
    from orl.models import build_model

    ck = load_checkpoint(src)
    torch.manual_seed(0)
    model = build_model(Config.from_dict(ck["config"]).model, ck["stage"])
    save_checkpoint({"stage": ck["stage"], "config": ck["config"], "model": model.state_dict(),
                     "position": {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "finished": False},
                     "metrics": {"random_init_seed": 0}}, dest)


def torch_config(path: Path) -> dict:
    from orl.checkpoint import load_checkpoint

    return dict(load_checkpoint(path)["config"])


def import_study(dataset_id: int, artifacts: Path) -> dict:
    """The study's stage 1 and its mining as a pretrain job and a mine job of the dataset."""
    from sqlalchemy import select

    from orl.correspondence import Correspondence
    from services.common.db import chunks, insert_ignore, session_scope
    from services.common.models import Artifact, Image, Job, Neighbor, Proposal, RoiPair

    corr = Correspondence.load(MINING)
    folder = artifacts / "imported"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(CHECKPOINT, folder / CHECKPOINT.name)
    random_init_checkpoint(CHECKPOINT, folder / "random_init.pt")
    with session_scope() as s:
        images = s.execute(select(Image.id, Image.rel_path).where(Image.dataset_id == dataset_id)).all()
        by_name = {PurePosixPath(p).name: int(i) for i, p in images}
        missing = [f for f in corr.files if PurePosixPath(f).name not in by_name]
        if missing or len(by_name) != len(images):
            raise SystemExit(f"{len(missing)} mined photos are not registered (e.g. {missing[:3]}), or file names "
                             "repeat in the dataset; the mining cannot be matched by file name")
        ids = [by_name[PurePosixPath(f).name] for f in corr.files]
        config = torch_config(CHECKPOINT)
        # Two stage-1 jobs, one checkpoint each (as the trainer writes them): the network at
        # initialisation, and the study's after 3,008 steps (e188 is the newer row, so the pages
        # pick it by default).
        init_job = Job(kind="pretrain", dataset_id=dataset_id, status="succeeded",
                       params={"epochs": 0, "note": "random initialisation (seed 0) of the study's configuration"})
        pretrain = Job(kind="pretrain", dataset_id=dataset_id, status="succeeded", progress_done=3008,
                       progress_total=3008, params={"imported_from": str(CHECKPOINT.relative_to(REPO))},
                       result={"epochs": 188, "global_step": 3008})
        s.add_all([init_job, pretrain])
        s.flush()
        init = Artifact(job_id=init_job.id, dataset_id=dataset_id, kind="checkpoint", stage="byol",
                        path="imported/random_init.pt",
                        meta={"config": config, "preset": config.get("preset"), "global_step": 0, "total_steps": 0,
                              "init_seed": 0})
        s.add(init)
        s.flush()
        e188 = Artifact(job_id=pretrain.id, dataset_id=dataset_id, kind="checkpoint", stage="byol",
                        path="imported/e188.pt",
                        meta={"config": config, "preset": config.get("preset"), "global_step": 3008,
                              "total_steps": 3008, "images": len(corr)})
        s.add(e188)
        s.flush()
        mine = Job(kind="mine", dataset_id=dataset_id, status="succeeded", progress_done=len(corr),
                   progress_total=len(corr),
                   params={"checkpoint_id": e188.id, "params_key": PARAMS_KEY,
                           "imported_from": str(MINING.relative_to(REPO))},
                   result={"phase": "done", "images": len(corr), "pairs": corr.num_pairs,
                           "config": {"mine": corr.info.get("mine_config")}})
        s.add(mine)
        s.flush()
        neighbours = [{"job_id": mine.id, "image_id": ids[i], "rank": k, "neighbor_image_id": ids[int(j)],
                       "similarity": float(corr.knn_sim[i, k])}
                      for i in range(len(corr)) for k, j in enumerate(corr.knn[i]) if j >= 0]
        # pairs[i][k]: image i with its k-th neighbour, best first (rank = row); boxes xyxy
        pairs = [{"job_id": mine.id, "image_id": ids[i], "neighbor_image_id": ids[int(corr.knn[i, k])],
                  "neighbor_rank": k, "rank": r, "score": float(score),
                  **dict(zip(("qx1", "qy1", "qx2", "qy2", "nx1", "ny1", "nx2", "ny2"), map(float, box), strict=True))}
                 for i, row in enumerate(corr.pairs) for k, arr in enumerate(row)
                 for r, (box, score) in enumerate(zip(arr, corr.pair_scores[i][k], strict=True))]
        # The filtered selective-search boxes each pair was chosen from (the exports include them).
        boxes = [{"image_id": ids[i], "params_key": PARAMS_KEY, "ord": o,
                  **dict(zip(("x1", "y1", "x2", "y2"), map(float, box), strict=True))}
                 for i, arr in enumerate(corr.boxes) for o, box in enumerate(arr)]
        for part in chunks(boxes, 2000):
            insert_ignore(s, Proposal, part)
        for part in chunks(neighbours, 2000):
            insert_ignore(s, Neighbor, part)
        for part in chunks(pairs, 2000):
            insert_ignore(s, RoiPair, part)
        return {"pretrain": pretrain.id, "init_job": init_job.id, "mine": mine.id, "checkpoint": e188.id,
                "random_init": init.id, "images": len(corr), "pairs": corr.num_pairs, "neighbours": len(neighbours),
                "boxes": len(boxes)}


def load_objects(data: Path) -> tuple[dict[str, object], int, dict[str, str]]:
    """({file name: orl.labels.ImageObjects} of every labelled photo, number of classes,
    {class name: COCO supercategory}). coco128 has YOLO labels, coco-mini COCO json; both use
    the 80 COCO class names in the same order (the study checks it too)."""
    from orl.labels import load_labels

    sources = (("coco128/images", "coco128/labels"), ("coco-mini", "coco-mini/annotations"))
    objects: dict[str, object] = {}
    classes = None
    for img_rel, lab_rel in sources:
        gt = load_labels(data / img_rel, data / lab_rel)
        if classes is not None and gt.classes != classes:
            raise SystemExit(f"{lab_rel} names its classes differently from {sources[0][1]}")
        classes = gt.classes
        objects.update({PurePosixPath(rel).name: obj for rel, obj in gt.objects.items()})
    cats = json.loads((data / "coco-mini" / "annotations" / "instances_val2017.json").read_text())["categories"]
    return objects, len(classes or ()), {c["name"]: c["supercategory"] for c in cats}


def write_label_csv(path: Path, objects: dict, supercategory: dict[str, str]) -> int:
    """image,label rows: each labelled photo's supercategory of the class covering the most box
    area (12 colours on the map instead of 80)."""
    from orl.embedding_map import dominant_class

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "label"])
        for name, obj in sorted(objects.items()):
            cls = dominant_class(obj.names, obj.boxes)
            out.writerow([name, supercategory.get(cls, cls)])
    return len(objects)


# -- 4. reviews -----------------------------------------------------------------------------------------
def review_by_labels(api: demo_stack.Api, job_id: int, objects: dict, num_classes: int) -> dict:
    """Judge the first REVIEW_SAMPLE pairs of the API's random sample (seed 0) whose two photos
    are labelled, by the study's rule, and record each verdict through the review endpoint."""
    import numpy as np

    from orl.metrics import pairs_correct

    page = api.call("GET", f"/api/v1/correspondences?job_id={job_id}&order=random&seed=0&limit=500")
    verdicts = {"correct": 0, "wrong": 0}
    for p in page["items"]:
        q_obj = objects.get(PurePosixPath(p["image_path"]).name)
        n_obj = objects.get(PurePosixPath(p["neighbor_path"]).name)
        if q_obj is None or n_obj is None:
            continue  # an unlabelled photo (coco-mini/unlabeled): no verdict
        ok = bool(pairs_correct(np.asarray([p["query_box"]]), np.asarray([p["neighbor_box"]]), q_obj, n_obj,
                                num_classes, 0.5, rule="ioa")[0])
        verdict = "correct" if ok else "wrong"
        api.call("PUT", f"/api/v1/correspondences/{p['id']}/review", {"verdict": verdict, "reviewer": REVIEWER})
        verdicts[verdict] += 1
        if sum(verdicts.values()) == REVIEW_SAMPLE:
            break
    return verdicts


# -- 5. the embedding map ----------------------------------------------------------------------------------
def embedding_map(api: demo_stack.Api, dataset_id: int, checkpoint_id: int, labels: Path, timeout_s: float) -> dict:
    job = api.call("POST", "/api/v1/jobs", {"kind": "embedding_map", "dataset_id": dataset_id,
                                            "params": {"checkpoint_id": checkpoint_id, "labels": str(labels)}})
    deadline = time.monotonic() + timeout_s
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise SystemExit(f"embedding_map job {job['id']} not done after {timeout_s:.0f} s: {job['status']}")
        time.sleep(3)
        job = api.call("GET", f"/api/v1/jobs/{job['id']}")
    if job["status"] != "succeeded":
        raise SystemExit(f"embedding_map job {job['id']} {job['status']}: {job.get('error')}")
    return job


# -- 6. screenshots ---------------------------------------------------------------------------------------
# What the page looks like to the script: decoded images, Streamlit's "running" widget, errors.
PAGE_STATE_JS = """
const imgs = [...document.querySelectorAll('[data-testid="stImage"] img')];
return {images: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
        running: !!document.querySelector('[data-testid="stStatusWidget"], [data-testid="stSpinner"]'),
        charts: document.querySelectorAll('[data-testid="stVegaLiteChart"] canvas, '
                                          + '[data-testid="stVegaLiteChart"] svg.marks').length,
        errors: [...document.querySelectorAll('[data-testid="stException"], [data-testid="stAlertContentError"]')]
                .map(e => e.innerText),
        text: document.body.innerText};
"""


def wait_ready(browser, what: str, min_images: int, texts: list[str], chart: bool = False,
               timeout_s: float = 240) -> dict:
    """The page once its images are decoded, its texts shown and Streamlit idle for 2 s."""
    deadline, idle_since = time.monotonic() + timeout_s, None
    while True:
        st = browser.script(PAGE_STATE_JS)
        if st["errors"]:
            raise SystemExit(f"{what}: the page shows an error: {st['errors']}")
        ready = (st["images"] >= min_images and st["decoded"] == st["images"] and not st["running"]
                 and all(t in st["text"] for t in texts) and (st["charts"] > 0 or not chart))
        now = time.monotonic()
        idle_since = (idle_since or now) if ready else None
        if idle_since is not None and now - idle_since >= 2.0:
            return st
        if now > deadline:
            missing = [t for t in texts if t not in st["text"]]
            raise SystemExit(f"{what}: not ready after {timeout_s:.0f} s ({st['decoded']}/{st['images']} images "
                             f"decoded, running={st['running']}, charts={st['charts']}, missing texts {missing})")
        time.sleep(0.5)


def save_png(png: bytes, path: Path) -> int:
    """A palette PNG (256 colours, dithered) of the screenshot, scaled down until it fits
    MAX_PNG_BYTES; returns its size in bytes."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    scale = 1.0
    while True:
        shown = img if scale == 1.0 else img.resize((round(img.width * scale), round(img.height * scale)),
                                                    Image.LANCZOS)
        buf = io.BytesIO()
        shown.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(
            buf, format="PNG", optimize=True)
        if buf.tell() <= MAX_PNG_BYTES or scale < 0.5:
            path.write_bytes(buf.getvalue())
            return buf.tell()
        scale *= 0.9


def hover_map_point(browser, image_id: int) -> str:
    """Move the mouse onto the image's dot and wait for its tooltip thumbnail; its URL."""
    from tests.services.test_dashboard import MAP_POINT_JS, TOOLTIP_IMAGE_JS

    xy = browser.script(MAP_POINT_JS, int(image_id))
    if xy is None:
        raise SystemExit(f"map: no dot for image {image_id}")
    browser.move_to(*xy)
    return browser.wait_for(lambda: browser.script(TOOLTIP_IMAGE_JS), 60, f"the tooltip thumbnail of image {image_id}")


def showcase_pair(ids: list[int]) -> tuple[int, int]:
    """(image id, neighbour id) with the most pairs in both directions (the Image page draws both):
    the largest min(pairs i -> j, pairs j -> i), then the higher similarity."""
    from orl.correspondence import Correspondence

    corr = Correspondence.load(MINING)
    count = {(i, int(corr.knn[i, k])): (len(arr), float(corr.knn_sim[i, k]))
             for i, row in enumerate(corr.pairs) for k, arr in enumerate(row) if corr.knn[i, k] >= 0}
    (i, j), _ = max(((key, (min(n, count.get(key[::-1], (0, 0))[0]), sim)) for key, (n, sim) in count.items()),
                    key=lambda kv: kv[1])
    return ids[i], ids[j]


def screenshots(dash: str, out: Path, seeded: dict) -> dict[str, int]:
    from tests.services.test_dashboard import CHROMEDRIVER, CHROMIUM, WebDriver

    if not (CHROMIUM and CHROMEDRIVER):
        raise SystemExit("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    ds, job, ckpt = seeded["dataset"], seeded["mine"], seeded["checkpoint"]
    image, nb = seeded["showcase"]
    # (file, URL, decoded images at least, texts that must be on screen, a chart, element to scroll to)
    pages = [
        ("dataset", f"page=dataset&dataset={ds}", 0, ["RoI pairs", "precision"], True, None),
        ("pairs", f"page=pairs&dataset={ds}&job={job}&order=random&seed=0&per_page=10", 10, ["score ", "reviews ✓"],
         False, None),
        ("image", f"page=image&dataset={ds}&image={image}&nb={nb}", 10, ["nearest images", "similarity"], False,
         None),
        ("image_pairs", f"page=image&dataset={ds}&image={image}&nb={nb}", 10, ["as the query"], False,
         "Pairs between"),
        ("map", f"page=map&dataset={ds}&checkpoint={ckpt}", 0, ["hover a dot"], True, None),
        ("jobs", f"page=jobs&dataset={ds}", 0, ["embedding_map", "succeeded"], False, None),
        ("attention", f"page=attention&dataset={ds}&image={image}&a={ckpt}&b={seeded['random_init']}", 4,
         ["raw value range"], False, None),
    ]
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        browser = WebDriver(Path(tmp) / "profile", width=WINDOW[0], height=WINDOW[1])
        try:
            for name, query, min_images, texts, chart, scroll_to in pages:
                browser.get(f"{dash}/?{query}")
                wait_ready(browser, name, min_images, texts, chart)
                if scroll_to:
                    browser.script("const h = [...document.querySelectorAll('h1, h2, h3')]"
                                   f".find(e => e.innerText.includes({json.dumps(scroll_to)}));"
                                   "h.scrollIntoView({block: 'start'});")
                    time.sleep(1.0)
                if name == "map":
                    hover_map_point(browser, image)
                sizes[name] = save_png(browser.screenshot_png(), out / f"{name}.png")
                print(f"{out / (name + '.png')}: {sizes[name] // 1000} KB", flush=True)
        finally:
            browser.quit()
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    p.add_argument("--state", type=Path, default=REPO / ".state" / "screenshots",
                   help="the stack's state folder; emptied first (a fresh database)")
    p.add_argument("--data", type=Path, default=DATA, help="the folder holding coco128/ and coco-mini/")
    p.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    p.add_argument("--reuse", action="store_true",
                   help="screenshots only, of the stack a run with --keep left (same --state)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the embedding map job may take")
    args = p.parse_args(argv)
    state_dir, data = args.state.resolve(), args.data.resolve()
    if not (data / "coco128").is_dir() or not (data / "coco-mini").is_dir():
        raise SystemExit(f"{data} lacks coco128/ or coco-mini/; give --data")

    seeded_file = state_dir / "seeded.json"
    if args.reuse:
        state = stack.State(state_dir).load()
        if not seeded_file.exists() or stack.status(state) != 0:
            raise SystemExit(f"no running stack with imported data in {state_dir}: run without --reuse first")
        seeded = json.loads(seeded_file.read_text())
        screenshots(state.config["urls"]["dashboard"], args.out, seeded)
        return 0
    stack.main(["clean", "--state", str(state_dir)])
    labels = state_dir / "labels" / "supercategories.csv"
    # The photos and the label file must lie under a data root of the services.
    os.environ["ORL_DATA_ROOTS"] = f"{data}:{labels.parent}"
    if stack.main(["up", "--state", str(state_dir), "--services", "api,miner-cpu,miner-gpu,dashboard"]) != 0:
        return 1
    try:
        state = stack.State(state_dir).load()
        urls = state.config["urls"]
        env = stack.service_env(state)
        os.environ.update({k: env[k] for k in ("ORL_DATABASE_URL", "ORL_ARTIFACTS_DIR")})
        api = demo_stack.Api(urls["api"], state.token())
        ds = register(api, data, 490)
        seeded = {"dataset": ds["id"], **import_study(ds["id"], Path(env["ORL_ARTIFACTS_DIR"]))}
        print(f"dataset {ds['id']}: {seeded}", flush=True)
        objects, num_classes, supercategory = load_objects(data)
        seeded["labelled"] = write_label_csv(labels, objects, supercategory)
        seeded["reviews"] = review_by_labels(api, seeded["mine"], objects, num_classes)
        print(f"reviews by {REVIEWER}: {seeded['reviews']}", flush=True)
        images = api.call("GET", f"/api/v1/datasets/{ds['id']}/images?limit=500")["items"]
        by_name = {PurePosixPath(im["rel_path"]).name: im["id"] for im in images}
        from orl.correspondence import Correspondence

        ids = [by_name[PurePosixPath(f).name] for f in Correspondence.load(MINING).files]
        seeded["showcase"] = showcase_pair(ids)
        job = embedding_map(api, ds["id"], seeded["checkpoint"], labels, args.timeout)
        print(f"embedding map job {job['id']}: {job['result'].get('method')}, {job['result'].get('points')} points",
              flush=True)
        seeded_file.write_text(json.dumps(seeded))
        screenshots(urls["dashboard"], args.out, seeded)
    finally:
        if not args.keep:
            stack.main(["down", "--state", str(state_dir)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
