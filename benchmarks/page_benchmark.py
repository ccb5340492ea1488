#!/usr/bin/env python
"""Page benchmark: how long the dashboard's Pairs page takes to show 20 pairs, warm cache.

1. Starts the stack, or reuses it (``scripts/demo_stack.py`` in its own state folder, default
   ``.state/page-bench``): the bundled sample (data/sample/, 32 photos) registered, and one
   ``tiny`` pipeline (pretrain -> mine -> train) run through the API; a rerun reuses the finished
   job (its Idempotency-Key), so only the first run mines.
2. Opens ``?page=pairs&per_page=20`` on the mining job's pairs, best first:
   - in headless Chromium (Debian's chromium + chromium-driver, driven over WebDriver as in
     tests/services/test_dashboard.py), from navigation to all 80 images decoded by the browser
     (two boxed thumbnails and two crops per pair) and the scores on screen, by the page's own
     clock (performance.now()), with the CPU time the servers and the browser spent. The first
     load fills the caches (cold, reported apart); each repeat is a new page load, so a new
     Streamlit session whose script runs again, with the dashboard's image cache warm;
   - in Streamlit's AppTest (the page's script alone, no browser): one run, warm.
3. Writes the medians, every sample, the load average and the niceness to
   benchmarks/results/page_benchmark.json and .md.

Usage: nice -n 15 python benchmarks/page_benchmark.py [--repeats 3] [--state DIR] [--down]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import demo_stack  # noqa: E402  (scripts/demo_stack.py)
import stack  # noqa: E402  (scripts/stack.py)

RESULTS = REPO / "benchmarks" / "results"
PAIRS = 20
TARGET_S = 2.0
NOTE = ("the machine was shared with a long high-priority study (see load_average_*); this script and the stack "
        "ran at the niceness given, with few repeats: wall times mostly measure waiting for a core, the cpu_* "
        "fields what a page load costs")


def _sample_job(api: demo_stack.Api) -> tuple[int, int]:
    """(dataset id, mine job id) of the sample's newest succeeded pipeline with at least PAIRS pairs."""
    ds = next(d for d in api.call("GET", "/api/v1/datasets?limit=500")["items"] if d["name"] == "sample")
    for job in api.call("GET", f"/api/v1/jobs?dataset_id={ds['id']}&kind=mine&status=succeeded")["items"]:
        pairs = api.call("GET", f"/api/v1/correspondences?job_id={job['id']}&limit={PAIRS}")["items"]
        if len(pairs) >= PAIRS:
            return ds["id"], job["id"]
    raise SystemExit(f"no succeeded mining job of dataset {ds['id']} has {PAIRS} pairs")


def _cpu_s(pgids: list[int]) -> float:
    """CPU seconds (user + system) used so far by the live processes of these process groups.

    On a machine this loaded, wall time mostly measures waiting for a core; the CPU time a page
    load costs is what an idle machine would spend on it."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in pgids or int(fields[3]) in pgids:  # process group, session; then utime, stime
            total += int(fields[11]) + int(fields[12])
    return total / tick


def _stats(wall: list[float], cpu: dict[str, list[float]]) -> dict:
    """The first sample is the cold one; medians over the rest."""
    out = {"cold_s": round(wall[0], 3), "warm_s": [round(s, 3) for s in wall[1:]],
           "warm_median_s": round(statistics.median(wall[1:]), 3)}
    for name, samples in cpu.items():
        out[f"cpu_{name}_cold_s"] = round(samples[0], 3)
        out[f"cpu_{name}_warm_median_s"] = round(statistics.median(samples[1:]), 3)
    return out


def _chromium(url: str, repeats: int, servers: list[int]) -> dict:
    from tests.services.test_dashboard import CHROMEDRIVER, CHROMIUM, WebDriver

    if not (CHROMIUM and CHROMEDRIVER):
        return {"skipped": "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"}
    # Runs in the page: resolves with performance.now() (ms since the navigation started) once
    # every image is decoded and the scores are on screen. Checked every 50 ms inside the page,
    # and the costly innerText only once the images are there, so the measuring hardly adds work.
    ready_js = ("const done = arguments[arguments.length - 1];"
                "const check = () => ([...document.querySelectorAll('[data-testid=\"stImage\"] img')]"
                f".filter(i => i.complete && i.naturalWidth > 0).length >= {4 * PAIRS}"
                " && document.body.innerText.includes('score ')) ? done(performance.now()) : setTimeout(check, 50);"
                "check();")
    wall: list[float] = []
    cpu: dict[str, list[float]] = {"servers": [], "browser": []}
    with tempfile.TemporaryDirectory() as tmp:
        browser = WebDriver(Path(tmp) / "profile", width=1500, height=1900)
        session = f"/session/{browser.session}"
        try:
            browser._call("POST", f"{session}/timeouts", {"script": 300_000})
            for _ in range(repeats + 1):  # the first load fills the caches
                browser.get("about:blank")
                before = _cpu_s(servers), _cpu_s([browser.proc.pid])
                browser.get(url)
                wall.append(browser._call("POST", f"{session}/execute/async", {"script": ready_js, "args": []}) / 1e3)
                cpu["servers"].append(_cpu_s(servers) - before[0])
                cpu["browser"].append(_cpu_s([browser.proc.pid]) - before[1])
        finally:
            browser.quit()
    return _stats(wall, cpu)


def _apptest(api_url: str, token: str, dataset: int, job: int, repeats: int, servers: list[int]) -> dict:
    from streamlit.testing.v1 import AppTest

    os.environ["ORL_API_URL"], os.environ["ORL_API_TOKEN"] = api_url, token
    wall: list[float] = []
    cpu: dict[str, list[float]] = {"process": [], "servers": []}
    for _ in range(repeats + 1):
        at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=180)
        for k, v in {"page": "pairs", "dataset": dataset, "job": job, "per_page": PAIRS}.items():
            at.query_params[k] = str(v)
        before = time.process_time(), _cpu_s(servers)
        t0 = time.perf_counter()
        at.run()
        wall.append(time.perf_counter() - t0)
        cpu["process"].append(time.process_time() - before[0])
        cpu["servers"].append(_cpu_s(servers) - before[1])
        if at.exception or len(at.image) < 4 * PAIRS:
            raise SystemExit(f"AppTest: the Pairs page failed: {[e.value for e in at.exception]}, "
                             f"{len(at.image)} images")
    # AppTest runs the script in this process: the first run fills its image cache, the rest are warm.
    return _stats(wall, cpu)


def _markdown(res: dict) -> str:
    c, a = res["chromium"], res["apptest"]
    if "warm_median_s" in c:
        chromium = (f"{c['warm_median_s']:.2f} s (samples {', '.join(f'{s:.2f}' for s in c['warm_s'])}; "
                    f"cold {c['cold_s']:.2f} s) | {c['cpu_servers_warm_median_s']:.2f} s | "
                    f"{c['cpu_browser_warm_median_s']:.2f} s")
    else:
        chromium = f"{c['skipped']} | | "
    apptest = (f"{a['warm_median_s']:.2f} s (cold {a['cold_s']:.2f} s) | "
               f"{a['cpu_servers_warm_median_s']:.2f} s (API) | "
               f"{a['cpu_process_warm_median_s']:.2f} s (the script, and AppTest itself)")
    verdict = ("meets" if c.get("warm_median_s", 1e9) < TARGET_S else "misses") + f" the {TARGET_S:.0f} s target"
    cpu_total = c.get("cpu_servers_warm_median_s", 0) + c.get("cpu_browser_warm_median_s", 0)
    share = c.get("cpu_browser_warm_median_s", 0) / cpu_total if cpu_total else 0
    return f"""# Pairs page benchmark ({res['pairs']} pairs, warm cache)

`nice -n 15 python benchmarks/page_benchmark.py --repeats {res['repeats']}` on {res['machine']}, {res['date']}.

| measure | wall, median | CPU of dashboard + API | CPU elsewhere |
|---|---|---|---|
| headless Chromium: navigation to all {4 * res['pairs']} images decoded and the scores shown | {chromium} |
| Streamlit AppTest: one run of the page's script (no browser) | {apptest} |

In wall time the page {verdict} in the browser here. **Conditions:** the machine was shared with
a long study running at high priority, load average {res['load_average_before']} before and
{res['load_average_after']} after (1, 5, 15 min) on {res['cpus']} CPU cores; this script and the
stack it started ran at niceness {res['niceness']}, with {res['repeats']} warm repeats only. Wall
time therefore mostly measures waiting for a core. The CPU columns are what a page load costs
(user + system seconds of those processes during the load): {cpu_total:.2f} s in all, {share:.0%} of
it in the headless browser (Streamlit's frontend laying out the page's ~{20 * res['pairs']} elements,
rasterised in software: `--disable-gpu`), the rest in the dashboard and the API, which serve a warm
page from memory (no image is decoded or encoded) and from the thumbnail files.

**What is measured.** The stack of `make up` (API, miners, trainer, dashboard) on the bundled
sample, mined by a `tiny` pipeline (mining job {res['job_id']}). Warm: the thumbnails are on the
artifacts volume (rendered by the mining job), the page's images in the dashboard's image cache and
the drawn ones in its `st.cache_data` (filled by the first, cold load); each repeat is a new page
load, so a new Streamlit session whose script runs again. Chromium is driven over WebDriver
(chromedriver from Debian); the page itself reports when it is complete (`performance.now()`,
from the start of the navigation, checked every 50 ms in the page).
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="warm measurements per method (after one cold load)")
    p.add_argument("--state", default=str(REPO / ".state" / "page-bench"), help="the stack's state folder")
    p.add_argument("--out", type=Path, default=RESULTS / "page_benchmark")
    p.add_argument("--down", action="store_true", help="stop the stack afterwards (its data is kept)")
    args = p.parse_args(argv)

    load_before = [round(v, 2) for v in os.getloadavg()]
    if demo_stack.main(["--preset", "tiny", "--epochs", "1", "--state", args.state]) != 0:
        return 1
    state = stack.State(Path(args.state).resolve()).load()
    urls, token = state.config["urls"], state.token()
    api = demo_stack.Api(urls["api"], token)
    dataset, job = _sample_job(api)
    page = f"{urls['dashboard']}/?page=pairs&dataset={dataset}&job={job}&per_page={PAIRS}"
    # Each service runs in a process group of its own (stack.py starts it in a new session).
    dash, api_pid = (int((stack.read_pidfile(state, name) or {})["pid"]) for name in ("dashboard", "api"))
    try:
        res = {
            "pairs": PAIRS, "repeats": args.repeats, "dataset_id": dataset, "job_id": job, "url": page,
            "chromium": _chromium(page, args.repeats, [dash, api_pid]),
            "apptest": _apptest(urls["api"], token, dataset, job, args.repeats, [api_pid]),
            "target_s": TARGET_S, "niceness": os.nice(0), "cpus": os.cpu_count(), "note": NOTE,
            "load_average_before": load_before, "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "machine": f"{platform.node()} ({platform.machine()}, Python {platform.python_version()})",
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
    finally:
        if args.down:
            stack.main(["down", "--state", args.state])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(res))
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
