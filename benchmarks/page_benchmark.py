#!/usr/bin/env python
"""Page benchmark: how long the dashboard's Pairs page takes to show 20 pairs, warm cache, and where
the time goes.

1. Starts the stack, or reuses it (``scripts/demo_stack.py`` in its own state folder, default
   ``.state/page-bench``): the bundled sample (data/sample/, 32 photos) registered, and one
   ``tiny`` pipeline (pretrain -> mine -> train) run through the API; a rerun reuses the finished
   job (its Idempotency-Key), so only the first run mines.
2. With ``--compare REF``, also serves the dashboard of git revision REF (``git archive REF
   dashboard``) from a second Streamlit process on the same API, and a one-line Streamlit app (the
   floor: what any Streamlit page costs to load). Every measurement below then alternates between
   them, so "before" and "after" see the same load.
3. Opens ``?page=pairs&per_page=20`` on the mining job's pairs, best first:
   - in headless Chromium (Debian's chromium + chromium-driver, driven over WebDriver as in
     tests/services/test_dashboard.py), from navigation until every image on the page is decoded,
     the last pair's number is on screen and Streamlit's script has finished, by the page's own
     clock (performance.now()). For each load: the browser's main-thread time (Chrome DevTools'
     Performance.getMetrics: JavaScript, layout, style, the rest), the CPU time the dashboard and
     API processes spent, the page's element count, and when its first and last image arrived.
     The first load of each variant fills the caches (cold, reported apart); each repeat is a new
     page load, so a new Streamlit session whose script runs again, with the caches warm;
   - in Streamlit's AppTest (the page's script alone, no browser; one process per variant, as
     both are the ``dashboard`` package): one run, warm;
   - the API alone: the page's pairs (one GET) and its 80 image requests (8 at a time, as the
     dashboard fetches them on a cold cache), and the dashboard's drawing of them (boxes, frames,
     JPEG encoding) the way each variant does it, which a warm page skips.
4. Writes the medians, every sample, the load average (before, after, and at each browser load) and
   the niceness to benchmarks/results/page_benchmark.json and .md.

Usage: nice -n 15 python benchmarks/page_benchmark.py [--repeats 5] [--compare REF] [--state DIR] [--down]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import demo_stack  # noqa: E402  (scripts/demo_stack.py)
import stack  # noqa: E402  (scripts/stack.py)

from benchmarks.results_file import write_results  # noqa: E402  (needs REPO on sys.path)

RESULTS = REPO / "benchmarks" / "results"
PAIRS = 20
TARGET_S = 2.0
FLOOR_APP = 'import streamlit as st\n\nst.markdown("**#20** the floor: a page with one line")\n'


# -- measuring helpers ---------------------------------------------------------------------------------
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


def _med(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def _summary(samples: list[dict]) -> dict:
    """The first sample is the cold one; medians of each field over the rest."""
    keys = [k for k, v in samples[0].items() if isinstance(v, (int, float))]
    return {"cold": samples[0], "warm_median": {k: _med([s[k] for s in samples[1:]]) for k in keys},
            "warm": samples[1:]}


def _start_streamlit(app: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    from tests.services.test_dashboard import START_TIMEOUT_S, free_port, start, wait_http

    port = free_port()
    proc = start([str(Path(sys.executable).parent / "streamlit"), "run", str(app), "--server.port", str(port),
                  "--server.headless", "true"], env, log)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/_stcore/health", max(START_TIMEOUT_S, 180), proc, log)
    return proc, url


# -- Chromium -------------------------------------------------------------------------------------------
# Runs in the page: resolves with performance.now() (ms since the navigation started) once every
# image is decoded, the last pair's number is shown and Streamlit's "running" widget is gone.
# Checked every 50 ms inside the page, and the costly innerText only once the images are there.
READY_JS = f"""
const done = arguments[arguments.length - 1];
const check = () => {{
  const imgs = [...document.querySelectorAll('[data-testid="stImage"] img')];
  const ok = imgs.length >= arguments[0] && imgs.every(i => i.complete && i.naturalWidth > 0)
    && !document.querySelector('[data-testid="stStatusWidget"]') && document.body.innerText.includes('#{PAIRS}');
  ok ? done(performance.now()) : setTimeout(check, 50);
}};
check();
"""
# When the page's images were requested and arrived (Resource Timing, ms since navigation).
TIMELINE_JS = """
const media = performance.getEntriesByType('resource')
  .filter(r => r.name.includes('/media/') && !r.name.includes('/static/'));  // not Streamlit's fonts
return {images: document.querySelectorAll('[data-testid="stImage"] img').length,
        elements: document.getElementsByTagName('*').length,
        first_image_requested_s: media.length ? Math.min(...media.map(r => r.startTime)) / 1e3 : null,
        last_image_arrived_s: media.length ? Math.max(...media.map(r => r.responseEnd)) / 1e3 : null};
"""
# Chrome's counters for the page's renderer (seconds; they restart with each new document): the
# CPU time of its main thread and of the whole renderer process (raster, image decoding ...), and
# how long the main thread was busy with tasks, split into JavaScript, layout and style. The busy
# times are wall-clock, so on a loaded machine they include waiting for a core; the CPU times not.
BROWSER_METRICS = {"ThreadTime": "browser_main_thread_cpu_s", "ProcessTime": "browser_renderer_cpu_s",
                   "TaskDuration": "browser_busy_s", "ScriptDuration": "browser_busy_js_s",
                   "LayoutDuration": "browser_busy_layout_s", "RecalcStyleDuration": "browser_busy_style_s"}


def _chromium(variants: dict[str, tuple[str, int]], repeats: int, servers: dict[str, list[int]]) -> dict:
    """Alternating page loads of each variant: {name: summary}. variants: {name: (url, min images)}."""
    from tests.services.test_dashboard import CHROMEDRIVER, CHROMIUM, WebDriver

    if not (CHROMIUM and CHROMEDRIVER):
        return {"skipped": "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"}
    samples: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        browser = WebDriver(Path(tmp) / "profile", width=1500, height=1900)
        session = f"/session/{browser.session}"

        def metrics() -> dict[str, float]:
            got = browser._call("POST", f"{session}/goog/cdp/execute", {"cmd": "Performance.getMetrics", "params": {}})
            return {m["name"]: m["value"] for m in got["metrics"]}

        try:
            browser._call("POST", f"{session}/timeouts", {"script": 300_000})
            browser._call("POST", f"{session}/goog/cdp/execute", {"cmd": "Performance.enable", "params": {}})
            for _ in range(repeats + 1):  # the first round fills the caches
                for name, (url, min_images) in variants.items():
                    browser.get("about:blank")
                    load = os.getloadavg()[0]
                    pg = servers.get(name, [])
                    before = _cpu_s(pg), metrics()
                    browser.get(url)
                    wall = browser._call("POST", f"{session}/execute/async",
                                         {"script": READY_JS, "args": [min_images]}) / 1e3
                    after = metrics()
                    sample = {"wall_s": round(wall, 3), "load_1min": round(load, 2),
                              "cpu_servers_s": round(_cpu_s(pg) - before[0], 3),
                              **{key: round(after[m] - before[1][m], 3) for m, key in BROWSER_METRICS.items()},
                              **browser.script(TIMELINE_JS)}
                    samples[name].append(sample)
                    print(f"chromium {name}: {sample}", flush=True)
        finally:
            browser.quit()
    return {name: _summary(s) for name, s in samples.items()}


# -- AppTest ---------------------------------------------------------------------------------------------
def _apptest_here(app: Path, api_url: str, token: str, dataset: int, job: int, repeats: int,
                  api_pgid: int) -> dict:
    """Runs in its own process (``--apptest APP``): the Pairs page's script ``repeats + 1`` times."""
    from streamlit.testing.v1 import AppTest

    os.environ["ORL_API_URL"], os.environ["ORL_API_TOKEN"] = api_url, token
    samples = []
    for _ in range(repeats + 1):
        at = AppTest.from_file(str(app), default_timeout=300)
        for k, v in {"page": "pairs", "dataset": dataset, "job": job, "per_page": PAIRS}.items():
            at.query_params[k] = str(v)
        before = time.process_time(), _cpu_s([api_pgid])
        t0 = time.perf_counter()
        at.run()
        # Pictures, not image elements: one st.image element may show a list of them (the whole page).
        pictures = sum(len(im.proto.imgs) for im in at.image)
        samples.append({"wall_s": round(time.perf_counter() - t0, 3),
                        "cpu_script_s": round(time.process_time() - before[0], 3),
                        "cpu_api_s": round(_cpu_s([api_pgid]) - before[1], 3), "images": pictures})
        if at.exception or pictures < PAIRS:
            raise SystemExit(f"AppTest {app}: the Pairs page failed: {[e.value for e in at.exception]}, "
                             f"{pictures} pictures")
    # AppTest runs the script in this process: the first run fills its caches, the rest are warm.
    return _summary(samples)


def _apptest(apps: dict[str, Path], args: list[str]) -> dict:
    out = {}
    for name, app in apps.items():
        run = subprocess.run([sys.executable, __file__, "--apptest", str(app), *args], cwd=REPO,
                             capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise SystemExit(f"AppTest of {name} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
        out[name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"apptest {name}: {out[name]['warm_median']}", flush=True)
    return out


# -- the API and the drawing alone ----------------------------------------------------------------------
def _api_and_drawing(api_url: str, job: int, repeats: int) -> dict:
    """The page's API requests timed from here, and the two ways of drawing a page's pictures."""
    import httpx

    from dashboard import drawing
    from dashboard.views.common import Api
    from dashboard.views.pairs import CROP_PX, THUMB_PX

    out: dict[str, list[float]] = {"api_pairs_s": [], "api_images_s": [], "draw_four_images_s": [],
                                   "draw_one_picture_s": []}
    with httpx.Client(base_url=f"{api_url}/api/v1", timeout=120) as http, ThreadPoolExecutor(8) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            pairs = http.get("/correspondences", params={"job_id": job, "limit": PAIRS}).raise_for_status().json()
            out["api_pairs_s"].append(time.perf_counter() - t0)
            reqs = [r for p in pairs["items"] for r in (
                Api.thumbnail_request(p["image_id"], THUMB_PX), Api.thumbnail_request(p["neighbor_image_id"], THUMB_PX),
                Api.crop_request(p["image_id"], p["query_box"], CROP_PX),
                Api.crop_request(p["neighbor_image_id"], p["neighbor_box"], CROP_PX))]
            t0 = time.perf_counter()
            bodies = list(pool.map(lambda r: http.get(r[0], params=r[1]).raise_for_status().content, reqs))
            out["api_images_s"].append(time.perf_counter() - t0)
            for key, one in (("draw_four_images_s", False), ("draw_one_picture_s", True)):
                t0 = time.perf_counter()
                for i, p in enumerate(pairs["items"]):
                    colour = drawing.pair_colour(i)
                    q, n, qc, nc = (drawing.open_image(b) for b in bodies[4 * i:4 * i + 4])
                    q_size, n_size = (p["image_width"], p["image_height"]), (p["neighbor_width"], p["neighbor_height"])
                    q = drawing.draw_box(q, drawing.scale_box(p["query_box"], q_size, q.size), colour)
                    n = drawing.draw_box(n, drawing.scale_box(p["neighbor_box"], n_size, n.size), colour)
                    drawn = [q, n, drawing.framed(qc, colour), drawing.framed(nc, colour)]
                    if one:
                        drawing.jpeg(drawing.side_by_side(drawn))
                    else:
                        for im in drawn:
                            drawing.jpeg(im)
                out[key].append(time.perf_counter() - t0)
    return {k: {"median": _med(v), "samples": [round(x, 3) for x in v]} for k, v in out.items()}


# -- report ---------------------------------------------------------------------------------------------
def _markdown(res: dict) -> str:
    c, a, api = res["chromium"], res["apptest"], res["api_and_drawing"]
    names = [n for n in ("after", "before", "floor") if n in c]
    labels = {"after": "this version", "before": f"before ({res.get('compare', {}).get('ref', '')})",
              "floor": "floor: a one-line Streamlit page"}
    rows = []
    for n in names:
        w = c[n]["warm_median"]
        samples = ", ".join(f"{s['wall_s']:.2f}" for s in c[n]["warm"])
        busy = w["browser_busy_s"] or 1.0
        split = " / ".join(f"{w[k] / busy:.0%}" for k in ("browser_busy_js_s", "browser_busy_layout_s",
                                                           "browser_busy_style_s"))
        last = w.get("last_image_arrived_s")
        rows.append(f"| {labels[n]} | {w['wall_s']:.2f} s ({samples}; cold {c[n]['cold']['wall_s']:.2f}) | "
                    f"{w['browser_main_thread_cpu_s']:.2f} s | {w['browser_renderer_cpu_s']:.2f} s | "
                    f"{w['browser_busy_s']:.2f} s ({split}) | {w['cpu_servers_s']:.2f} s | {w['elements']:.0f} | "
                    f"{w['images']:.0f} | " + (f"{last:.2f} s |" if last is not None else "- |"))
    ratio = res.get("ratio_before_over_after", {})
    per_round = res.get("ratio_before_over_after_per_round_median", {})
    ratios = (f"**Before / after**, warm medians of the same run: browser main-thread CPU "
              f"{ratio['browser_main_thread_cpu_s']:.2f}x, renderer CPU {ratio['browser_renderer_cpu_s']:.2f}x, "
              f"wall {ratio['wall_s']:.2f}x, page elements {ratio['elements']:.2f}x (the median of the ratios within "
              f"each round of back-to-back loads: wall {per_round['wall_s']:.2f}x, main-thread CPU "
              f"{per_round['browser_main_thread_cpu_s']:.2f}x). " if ratio else "")
    if ratio and c["after"]["warm_median"]["images"] < c["before"]["warm_median"]["images"]:
        ratios += (f"The images of a page arrive sooner: Streamlit serves each as a media file, and the browser "
                   f"fetches {c['after']['warm_median']['images']:.0f} instead of "
                   f"{c['before']['warm_median']['images']:.0f}. ")
    apptest = " · ".join(f"{labels[n]}: {a[n]['warm_median']['wall_s']:.2f} s wall, "
                         f"{a[n]['warm_median']['cpu_script_s']:.2f} s CPU (cold {a[n]['cold']['wall_s']:.2f} s)"
                         for n in a)
    after = c.get("after", {}).get("warm_median", {})
    floor = c.get("floor", {}).get("warm_median", {})
    verdict = ("meets" if after.get("wall_s", 1e9) < TARGET_S else "misses") + f" the {TARGET_S:.0f} s target"
    floor_text = (f"A one-line Streamlit page costs {floor['browser_main_thread_cpu_s']:.2f} s of main-thread "
                  f"CPU and {floor['wall_s']:.2f} s of wall time to load here: Streamlit's own start-up in the "
                  "browser, the same for every page. " if floor else "")
    loads = [s["load_1min"] for n in names for s in c[n]["warm"]]
    command_tail = f" --compare {res['compare']['ref']}" if res.get("compare") else ""
    header = ("| page | wall (samples; cold) | browser main-thread CPU | renderer CPU | main thread busy "
              "(JS / layout / style) | CPU of dashboard + API | elements | images | last image arrived |")
    return f"""# Pairs page benchmark ({res['pairs']} pairs, warm cache)

`nice -n 15 python benchmarks/page_benchmark.py --repeats {res['repeats']}{command_tail}`
on {res['machine']}, {res['date']}.

Headless Chromium, from navigation until every image is decoded, the last pair shown and the script done
(warm medians of {res['repeats']} loads each; the variants' loads alternate):

{header}
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{ratios}In wall time this version's page {verdict} here. {floor_text}

**Where the time goes (this version, warm).** Per load, the browser's renderer used
{after.get('browser_renderer_cpu_s', 0):.2f} s of CPU, {after.get('browser_main_thread_cpu_s', 0):.2f} s of it on its
main thread (Streamlit's frontend turning the page's {after.get('elements', 0):.0f} elements into React components,
styling and laying them out; the rest rasterises in software, `--disable-gpu`, and decodes the images). The
dashboard and the API together spent {after.get('cpu_servers_s', 0):.2f} s of CPU: a warm page's images come from the
dashboard's memory, its pairs from a 30 s cache. The page's script alone (Streamlit AppTest, no browser):
{apptest}. The API alone, from this script: {api['api_pairs_s']['median'] * 1e3:.0f} ms for the page's pairs,
{api['api_images_s']['median']:.2f} s for its {4 * res['pairs']} image requests (8 at a time, as the dashboard makes
them on a cold cache). Drawing the page's boxes and frames and encoding the JPEGs, which only a cold page does:
{api['draw_four_images_s']['median']:.2f} s as four images per pair (before),
{api['draw_one_picture_s']['median']:.2f} s as one picture per pair (this version).

**Conditions.** {res['note'] or 'No other job ran on the machine.'} Load average
{res['load_average_before']} before and {res['load_average_after']} after (1, 5, 15 min) on {res['cpus']} CPU cores,
{min(loads):.1f} to {max(loads):.1f} (1 min) at the warm browser loads (the stack this script started and the
browser count in it). This script and the stack ran at niceness {res['niceness']}. Where the load exceeds the
cores, wall and busy times include waiting for a core; the CPU columns are what a load costs, and the ratios
compare loads made under the same conditions.

**What is measured.** The stack of `make up` (API, miners, trainer, dashboard) on the bundled sample, mined by
a `tiny` pipeline (mining job {res['job_id']}). Warm: the thumbnails are on the artifacts volume (rendered by the
mining job), the page's images in the dashboard's image cache and the drawn ones in its `st.cache_data` (filled
by the first, cold load); each repeat is a new page load, so a new Streamlit session whose script runs again.
Chromium is driven over WebDriver (chromedriver from Debian); the page reports when it is complete
(`performance.now()`, checked every 50 ms in the page), DevTools' `Performance.getMetrics` the renderer's CPU
(`ThreadTime`, `ProcessTime`) and busy times, Resource Timing when the images arrived.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--note", default="", help="what else ran on the machine meanwhile (written into the results; "
                   "default: nothing else ran)")
    p.add_argument("--repeats", type=int, default=5, help="warm measurements per variant (after one cold load)")
    p.add_argument("--compare", metavar="REF", help="also measure the dashboard of this git revision, alternating")
    p.add_argument("--state", default=str(REPO / ".state" / "page-bench"), help="the stack's state folder")
    p.add_argument("--out", type=Path, default=RESULTS / "page_benchmark")
    p.add_argument("--down", action="store_true", help="stop the stack afterwards (its data is kept)")
    p.add_argument("--apptest", type=Path, help=argparse.SUPPRESS)  # internal: one variant's AppTest
    p.add_argument("--apptest-args", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.apptest:
        api_url, token, dataset, job, repeats, api_pgid = args.apptest_args
        print(json.dumps(_apptest_here(args.apptest, api_url, token, int(dataset), int(job), int(repeats),
                                       int(api_pgid))))
        return 0

    load_before = [round(v, 2) for v in os.getloadavg()]
    if demo_stack.main(["--preset", "tiny", "--epochs", "1", "--state", args.state]) != 0:
        return 1
    state = stack.State(Path(args.state).resolve()).load()
    urls, token = state.config["urls"], state.token()
    api = demo_stack.Api(urls["api"], token)
    dataset, job = _sample_job(api)
    query = f"/?page=pairs&dataset={dataset}&job={job}&per_page={PAIRS}"
    # Each service runs in a process group of its own (stack.py starts it in a new session).
    dash, api_pid = (int((stack.read_pidfile(state, name) or {})["pid"]) for name in ("dashboard", "api"))
    variants = {"after": (urls["dashboard"] + query, PAIRS)}
    servers = {"after": [dash, api_pid]}
    apps = {"after": REPO / "dashboard" / "app.py"}
    extra: list = []
    compare = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.compare:
                commit = subprocess.run(["git", "rev-parse", "--short", args.compare], cwd=REPO, check=True,
                                        capture_output=True, text=True).stdout.strip()
                old = Path(tmp) / "before"
                old.mkdir()
                archive = subprocess.run(["git", "archive", commit, "dashboard"], cwd=REPO, check=True,
                                         capture_output=True).stdout
                subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
                (Path(tmp) / "floor.py").write_text(FLOOR_APP)
                env = stack.service_env(state)
                before_proc, before_url = _start_streamlit(old / "dashboard" / "app.py", env, Path(tmp) / "before.log")
                floor_proc, floor_url = _start_streamlit(Path(tmp) / "floor.py", env, Path(tmp) / "floor.log")
                extra = [before_proc, floor_proc]
                variants.update(before=(before_url + query, PAIRS), floor=(floor_url, 0))
                servers.update(before=[before_proc.pid, api_pid], floor=[floor_proc.pid])
                apps["before"] = old / "dashboard" / "app.py"
                compare = {"ref": args.compare, "commit": commit}
            chromium = _chromium(variants, args.repeats, servers)
            apptest = _apptest(apps, ["--apptest-args", urls["api"], token, str(dataset), str(job),
                                      str(args.repeats), str(api_pid)])
            api_and_drawing = _api_and_drawing(urls["api"], job, args.repeats)
        finally:
            from tests.services.test_dashboard import stop

            for proc in extra:
                stop(proc)
            if args.down:
                stack.main(["down", "--state", args.state])
    res = {
        "pairs": PAIRS, "repeats": args.repeats, "dataset_id": dataset, "job_id": job, "url": urls["dashboard"] + query,
        "compare": compare, "chromium": chromium, "apptest": apptest, "api_and_drawing": api_and_drawing,
        "target_s": TARGET_S, "niceness": os.nice(0), "cpus": os.cpu_count(), "note": args.note,
        "load_average_before": load_before, "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }
    if "before" in chromium and "after" in chromium:
        b, a = chromium["before"]["warm_median"], chromium["after"]["warm_median"]
        keys = ("wall_s", "browser_main_thread_cpu_s", "browser_renderer_cpu_s", "browser_busy_s", "cpu_servers_s",
                "elements")
        res["ratio_before_over_after"] = {k: round(b[k] / a[k], 2) for k in keys if a.get(k)}
        # The same per round (each round loads "after" then "before" back to back), then the median.
        rounds = list(zip(chromium["after"]["warm"], chromium["before"]["warm"], strict=True))
        res["ratio_before_over_after_per_round_median"] = {
            k: _med([bb[k] / aa[k] for aa, bb in rounds if aa.get(k)]) for k in keys}
    write_results(args.out, res, _markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
