"""`make demo`: the whole system on the bundled sample, through the REST API.

    python scripts/demo_stack.py [--preset tiny] [--epochs 5] [--timeout 1800]

1. starts the stack (scripts/stack.py up: Postgres, Redis, API, miners, trainer, dashboard);
2. registers data/sample/images as dataset "sample" (POST /api/v1/datasets answers at once; a
   registration job on a miner CPU worker scans the folder, and the demo waits for it);
3. submits a pipeline job, pretrain -> mine -> train (POST /api/v1/jobs);
4. prints its progress until it succeeds or fails;
5. prints the number of mined pairs and the dashboard URL that shows them.

The stack keeps running afterwards (`make down` stops it). Running the demo again reuses the
finished job of the same settings instead of training again (its Idempotency-Key).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stack  # noqa: E402  (scripts/stack.py)

SAMPLE = stack.REPO / "data" / "sample" / "images"


class Api:
    """The few REST calls the demo makes (standard library only, like stack.py)."""

    def __init__(self, base_url: str, token: str):
        self.base_url, self.token = base_url.rstrip("/"), token

    def call(self, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> dict:
        req = urllib.request.Request(self.base_url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("detail", detail)
            except ValueError:
                pass
            raise SystemExit(f"{method} {path} -> {exc.code}: {detail}") from None


def pipeline_params(preset: str, epochs: int) -> dict:
    stage = {"preset": preset, "epochs": epochs}
    return {"pretrain": dict(stage), "mine": {"preset": preset}, "train": dict(stage)}


def describe(job: dict) -> str:
    p = job.get("progress") or {}
    parts = [f"job {job['id']} {job['kind']}: {job['status']}"]
    if p.get("total"):
        parts.append(f"{p.get('done', 0)}/{p['total']}")
    for key, fmt in (("epoch", "epoch {}"), ("step", "step {}"), ("loss", "loss {:.4f}"),
                     ("images_per_s", "{:.1f} img/s"), ("eta_s", "ETA {:.0f} s")):
        if isinstance(p.get(key), (int, float)):
            parts.append(fmt.format(p[key]))
    return ", ".join(parts)


def wait_registered(api: Api, ds: dict, timeout_s: float) -> dict:
    """The dataset once its registration job finished (POST /datasets answers before the scan)."""
    deadline = time.monotonic() + timeout_s
    job_id = (ds.get("registration") or {}).get("job_id")
    while job_id is not None:
        job = api.call("GET", f"/api/v1/jobs/{job_id}")
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if job["status"] != "succeeded":
                raise SystemExit(f"registering {ds['path']} {job['status']}: {job.get('error') or 'no error message'}")
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"the registration (job {job_id}) did not finish in {timeout_s:.0f} s; is a miner "
                             "CPU worker running?")
        time.sleep(0.5)
    return api.call("GET", f"/api/v1/datasets/{ds['id']}")


def follow(api: Api, job_id: int, timeout_s: float) -> dict:
    """Print the pipeline's progress (each stage's own line when it changes) until it finishes."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        job = api.call("GET", f"/api/v1/jobs/{job_id}")
        line = f"pipeline: {job['status']}, stage {job['progress'].get('stage', '?')} " \
               f"({job['progress'].get('done', 0)}/{job['progress'].get('total', 3)} stages done)"
        kids = job.get("children") or []
        if kids:
            line += " | " + describe(api.call("GET", f"/api/v1/jobs/{kids[-1]}"))
        if line != last:
            print(time.strftime("%H:%M:%S"), line, flush=True)
            last = line
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise SystemExit(f"the pipeline did not finish in {timeout_s:.0f} s; it keeps running: "
                             f"follow it in the dashboard or with GET /api/v1/jobs/{job_id}")
        time.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "cpu", "paper"])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the pipeline")
    p.add_argument("--state", default=None, help="state folder (default .state/, as for make up)")
    args, stack_args = p.parse_known_args(argv)

    # 1. the stack
    up_args = ["up", *stack_args] + (["--state", args.state] if args.state else [])
    if stack.main(up_args) != 0:
        return 1
    state = stack.State(Path(args.state or stack.default_state_dir()).resolve()).load()
    api = Api(state.config["urls"]["api"], state.token())

    # 2. the dataset (registering again rescans: idempotent)
    ds = wait_registered(api, api.call("POST", "/api/v1/datasets", {"name": "sample", "path": str(SAMPLE)}),
                         args.timeout)
    counts = ds.get("counts") or {}
    print(f"\ndataset {ds['id']} 'sample': {counts.get('images')} images ({counts.get('failed_images')} unreadable)")

    # 3. the pipeline; the key makes a rerun of the same demo return the finished job
    params = pipeline_params(args.preset, args.epochs)
    key = f"demo-{ds['id']}-{args.preset}-{args.epochs}"
    job = api.call("POST", "/api/v1/jobs", {"kind": "pipeline", "dataset_id": ds["id"], "params": params},
                   headers={"Idempotency-Key": key})
    if job["status"] in ("failed", "cancelled"):  # an earlier demo run that did not succeed: try anew
        job = api.call("POST", "/api/v1/jobs", {"kind": "pipeline", "dataset_id": ds["id"], "params": params},
                       headers={"Idempotency-Key": f"{key}-{uuid.uuid4().hex[:8]}"})
    print(f"pipeline job {job['id']} ({args.preset} preset, {args.epochs} epochs per training stage)\n")

    # 4. progress
    job = follow(api, job["id"], args.timeout)
    if job["status"] != "succeeded":
        print(f"\nthe pipeline {job['status']}: {job.get('error') or 'no error message'}")
        print(f"logs: {state.path('logs')}/")
        return 1

    # 5. the result
    hist = api.call("GET", f"/api/v1/correspondences/histogram?job_id={job['id']}&bins=1")
    stages = (job.get("result") or {}).get("stages") or {}
    mine_id = stages.get("mine", job["id"])
    dash = state.config["urls"]["dashboard"]
    print(f"""
The pipeline succeeded: {hist['total']} RoI pairs mined (mining job {mine_id}).
  pairs      {dash}/?page=pairs&dataset={ds['id']}&job={mine_id}
  attention  {dash}/?page=attention&dataset={ds['id']}
  jobs       {dash}/?page=jobs&dataset={ds['id']}
  API        {state.config['urls']['api']}/docs   (token in {state.path('api_token')})
The stack keeps running; `make down` stops it, `make clean` also deletes its data.""")
    return 0 if hist["total"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
