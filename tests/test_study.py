"""The study's own code (benchmarks/study/): aggregation, resumability, commits, the report.

The metrics it calls (pair AUC, precision, probe, label-free signals) are tested in
test_metrics.py, test_evaluate.py and test_monitor.py; these tests cover what the study adds
on top, on hand-made inputs. `python -m benchmarks.study --quick` runs the real pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from benchmarks.study import plan, report, store, units
from benchmarks.study.data import class_sharing_pairs
from orl.labels import GroundTruth, ImageObjects


# -- aggregation over seeds -----------------------------------------------------------------
def test_aggregate_paired_verdict():
    a = store.aggregate([0.5, 0.6, None, 0.7])
    assert a["n"] == 3 and a["mean"] == pytest.approx(0.6) and a["std"] == pytest.approx(0.1)
    assert store.aggregate([None]) == {"mean": None, "std": None, "n": 0, "values": []}
    p = store.paired({0: 0.5, 1: 0.6, 2: 0.4}, {0: 0.4, 1: 0.5, 2: 0.45, 3: 0.9})
    assert p["seeds"] == [0, 1, 2] and (p["wins"], p["losses"]) == (2, 1)
    assert store.verdict(p) == "mixed: higher in 2, lower in 1, equal in 0 of 3 seeds"
    assert store.verdict(store.paired({0: 1.0}, {0: 0.0})) == "higher (1 seed)"
    assert report.fmt_diff(store.paired({0: 0.52, 1: 0.50}, {0: 0.50, 1: 0.50})) == "+1.0 ± 1.4"


def test_mutual_pairs_hand_made():
    fq = np.eye(3, dtype=np.float32)
    # neighbour box 0 is nearest to query boxes 0 and 1 (a many-to-one the authors' rule keeps)
    fk = np.array([[0.9, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    ij, s = units.mutual_pairs(fq, fk, ratio=1.0)
    assert ij.tolist() == [[2, 1], [0, 0]]  # query 1's best (k0) prefers query 0: dropped
    assert s.tolist() == pytest.approx([1.0, 0.9])
    assert units.mutual_pairs(fq, fk, ratio=0.1)[0].tolist() == [[2, 1]]  # cap 1, best first
    assert units.mutual_pairs(fq[:0], fk, 1.0)[0].shape == (0, 2)


def test_loss_curves_dedupe_resumed_steps(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,step,global_step,lr,momentum,loss,loss_global,loss_intra,loss_inter,images_per_s,time\n"
        "0,1,1,0.1,0.99,4.0,2.0,1.0,1.0,8.0,0\n"
        "0,2,2,0.1,0.99,9.9,9.9,,,8.0,0\n"    # killed run: step 2 logged, then redone
        "0,2,2,0.1,0.99,3.0,2.0,1.0,,4.0,0\n"
        "1,1,3,0.1,0.99,2.0,2.0,,,8.0,0\n")
    curves, seconds = units.loss_curves(csv, batch=8)
    assert curves["total"] == [pytest.approx(3.5), pytest.approx(2.0)]
    assert curves["intra"] == [pytest.approx(1.0), None]
    assert seconds == pytest.approx(8 / 8 + 8 / 4 + 8 / 8)  # no usable clock: batch / images_per_s
    timed = csv.read_text().replace(",8.0,0\n", ",8.0,T\n").replace(",4.0,0\n", ",4.0,T\n")
    stamps = iter(["100.0", "900.0", "101.5", "102.0"])  # step 2's rows at 900 (dropped) and 101.5
    csv.write_text("".join(line.replace(",T", "," + next(stamps)) if ",T" in line else line
                           for line in timed.splitlines(keepends=True)))
    _, seconds = units.loss_curves(csv, batch=8)
    assert seconds == pytest.approx(8 / 8 + 1.5 + 0.5)  # first step: batch / ips; then clock gaps


def test_class_sharing_pairs_only_link_images_with_a_common_class():
    box = np.array([[0, 0, 10, 10]], dtype=np.float64)
    objects = {f: ImageObjects(box, np.array([c]), ("xy"[c],), (10, 10))
               for f, c in (("a", 0), ("b", 0), ("c", 1), ("d", 0))}
    gt = GroundTruth(["x", "y"], objects, {f: "train" for f in objects}, "yolo", "", "")
    files = ["a", "b", "c", "d", "unlabelled"]
    fixed = class_sharing_pairs(files, gt, k=3, seed=0)
    assert fixed.shape == (5, 3)
    for i in (0, 1, 3):
        assert sorted(fixed[i][fixed[i] >= 0].tolist()) == sorted({0, 1, 3} - {i})
    assert (fixed[2] == -1).all() and (fixed[4] == -1).all()  # no partner; unlabelled
    # the same partners whatever order the files come in
    order = ["d", "c", "b", "a", "unlabelled"]
    perm = class_sharing_pairs(order, gt, k=3, seed=0)
    names = lambda arr, fs: [sorted(fs[j] for j in row if j >= 0) for row in arr]  # noqa: E731
    assert dict(zip(files, names(fixed, files), strict=True)) == dict(zip(order, names(perm, order), strict=True))


# -- resumability and commits ----------------------------------------------------------------
def test_store_skips_done_units_records_errors_and_recomputation(tmp_path):
    path = tmp_path / "study_quick.json"
    settings = plan.MODES["quick"].settings()
    s = store.ResultsStore(path, "quick", settings)
    calls = []

    def ok():
        calls.append("ok")
        return {"value": np.float32(0.5)}

    def boom():
        raise ValueError("broken input")

    seen = []
    s.after_record = seen.append
    assert s.run_unit("train/s0/a", ok, log=lambda m: None)
    assert not s.run_unit("train/s0/b", boom, log=lambda m: None)
    assert seen == ["train/s0/a", "train/s0/b"] and s.errors == ["train/s0/b"]
    saved = json.loads(path.read_text())  # written after every unit
    assert saved["units"]["train/s0/a"]["value"] == 0.5
    assert saved["units"]["train/s0/b"]["error"] == "ValueError: broken input"

    again = store.ResultsStore(path, "quick", settings)  # a rerun
    assert again.run_unit("train/s0/a", ok, log=lambda m: None) and calls == ["ok"]  # skipped
    # its files are gone (a new machine): it runs again and says so
    assert again.run_unit("train/s0/a", ok, outputs_exist=False, log=lambda m: None) and calls == ["ok", "ok"]
    assert again.units["train/s0/a"]["recomputed"] == 1
    assert again.units["train/s0/a"]["previous"]["seconds"] == saved["units"]["train/s0/a"]["seconds"]
    assert again.run_unit("train/s0/b", ok, log=lambda m: None)  # a failed unit is retried
    assert not again.run_unit("train/s0/c", ok, out_of_time=True, log=lambda m: None)
    assert again.skipped == ["train/s0/c"]


def test_store_redo_marks_done_units_until_they_run_again(tmp_path):
    path = tmp_path / "study_quick.json"
    s = store.ResultsStore(path, "quick", plan.MODES["quick"].settings())
    s.run_unit("train/s0/a", lambda: {"loss": [1.0]}, log=lambda m: None)
    s.record("train/s0/b", {"status": "error", "error": "x"})
    assert s.mark_redo(["train/s0/a", "train/s0/b", "train/s0/none"]) == ["train/s0/a"]  # only done units
    again = store.ResultsStore(path, "quick", plan.MODES["quick"].settings())  # the mark is kept
    assert not again.done("train/s0/a")
    assert again.run_unit("train/s0/a", lambda: {"loss": [2.0]}, log=lambda m: None)
    rec = again.units["train/s0/a"]
    assert rec["loss"] == [2.0] and rec["previous"]["loss"] == [1.0] and rec["recomputed"] == 1
    assert "redo" not in rec and again.done("train/s0/a")
    calls = []
    assert again.run_unit("train/s0/a", lambda: calls.append(1) or {}, log=lambda m: None) and not calls


def test_store_refuses_other_settings_but_accepts_more_runs(tmp_path):
    path = tmp_path / "r.json"
    m = dataclasses.replace(plan.MODES["long"], runs=("byol_cont",))
    store.ResultsStore(path, "long", m.settings()).save()
    with pytest.raises(store.SettingsMismatch, match="--fresh"):
        store.ResultsStore(path, "long", dataclasses.replace(m, epochs=9).settings())
    more = store.ResultsStore(path, "long", dataclasses.replace(m, runs=("orl", "byol_cont")).settings())
    assert more.data["settings"]["runs"] == ["byol_cont", "orl"]
    assert m.settings() == dataclasses.replace(m, seeds=(0, 1, 2, 3), threads=1).settings()


def test_git_commit_commits_only_the_named_files(tmp_path):
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "other.txt").write_text("x")
    git("add", "other.txt")  # someone else's staged work
    (tmp_path / "r.json").write_text("{}")
    assert store.git_commit(tmp_path, [tmp_path / "r.json"], "study: unit done")
    assert git("log", "--name-only", "--format=%s").stdout.split() == ["study:", "unit", "done", "r.json"]
    assert "A  other.txt" in git("status", "--short").stdout  # still staged, not committed
    plain = tmp_path.parent / f"{tmp_path.name}_plain"  # not a repository: no commit, no exception
    plain.mkdir()
    (plain / "r.json").write_text("{}")
    assert not store.git_commit(plain, [plain / "r.json"], "x", tries=1)


def test_every_mode_is_well_formed():
    for m in plan.MODES.values():
        assert m.epochs in m.snapshots and 0 in m.snapshots, m.name
        assert set(m.runs) <= set(plan.RUNS) and set(m.variants) <= set(plan.VARIANTS)
        keys = plan.unit_keys(m.settings(), m.seeds)
        assert len(keys) == len(set(keys)), m.name
    long = plan.MODES["long"]
    assert long.epochs * 16 >= 3000  # 490 photos, batch 32: 16 steps per epoch


LONG_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "study_long.json"


def test_long_mode_signature_is_the_one_its_results_file_was_written_with():
    """A changed long signature would make the long study refuse to resume its results file."""
    sig = plan.signature(plan.MODES["long"].settings())
    assert sig == {"name": "long", "preset": "cpu", "overrides": plan.SMALL, "epochs": 188, "more_epochs": 63,
                   "snapshots": [0, 6, 19, 63, 125, 188], "control_epochs": 60, "svm": True, "per_folder": None}
    if LONG_RESULTS.exists():
        recorded = json.loads(LONG_RESULTS.read_text())
        assert plan.signature(recorded["settings"]) == sig
        # every unit the long study recorded is still one the plan runs
        done = {k for k, r in recorded["units"].items() if r.get("status") == "done"}
        assert done <= set(plan.unit_keys(recorded["settings"], recorded["seeds"]))


def test_long_mode_units_in_order():
    keys = plan.unit_keys(plan.MODES["long"].settings(), (0,))
    assert keys[:9] == ["train/s0/byol@e0", "mine/s0/e0", "eval/s0/e0", "train/s0/e0bn", "mine/s0/e0bn",
                        "eval/s0/e0bn", "train/s0/control", "mine/s0/control", "eval/s0/control"]
    assert keys[keys.index("eval/s0/e188") + 1:keys.index("eval/s0/e188") + 5] == [
        "mine/s0/e188+roi_align", "train/s0/byol_cont", "eval/s0/byol_cont", "mine/s0/byol_cont+roi_align"]
    assert keys[-2:] == ["mine/s0/e188+ss320", "mine/s0/e188+mutual"]  # roi_align is listed once, before the runs
    assert len(keys) == 6 * 3 + 2 * 3 + 1 + 5 * 3 + 2


def test_short_mode_is_lean_and_mines_every_unit_with_roi_align():
    short = plan.MODES["short"]
    st = short.settings()
    assert short.seeds == (0, 1, 2) and short.snapshots == (0, 50) and short.variants == ()
    assert short.control_epochs == 0 and short.runs == ("byol_cont", "orl_init")
    keys = plan.unit_keys(st, short.seeds)
    assert not any("+" in k or "control" in k for k in keys)
    assert [k for k in keys if k.startswith("mine/s1/")] == [f"mine/s1/{n}" for n in ("e0", "e0bn", "e50", "byol_cont",
                                                                                       "orl_init")]
    assert plan.mining_unit("orl_init", st) == "orl_init" and plan.comparable_minings("orl_init", "e50", st) == (
        "orl_init", "e50")
    long = plan.MODES["long"].settings()
    assert plan.comparable_minings("orl", "e188", long) == ("orl+roi_align", "e188+roi_align")
    assert plan.comparable_minings("e188", "e0bn", long) == ("e188", "e0bn")
    # the configuration each mining runs with (stage 3's pairs are the default mining of e<N>)
    from orl.config import get_preset

    def mine_cfg(mode, variant=None):
        study = object.__new__(units.Study)  # only mode and cfg: no photos needed
        study.mode, study.cfg = mode, get_preset(mode.preset).override(**mode.overrides).validate()
        return study.mine_cfg(variant)

    for roi_mode, cfg in (("roi_align", mine_cfg(short)), ("crop", mine_cfg(plan.MODES["long"])),
                          ("roi_align", mine_cfg(plan.MODES["long"], plan.VARIANTS["roi_align"]))):
        assert (cfg.roi_mode, cfg.ss_max_side_px, cfg.roi_dtype, cfg.roi_align_max_side_px) == (
            roi_mode, 500, "float32", 320)


def test_study_run_dispatches_the_planned_units_in_order(tmp_path):
    mode = dataclasses.replace(plan.MODES["short"], seeds=(1,))
    study = object.__new__(units.Study)
    study.mode = mode
    study.store = store.ResultsStore(tmp_path / "r.json", "short", mode.settings())
    study.store.record("eval/s1/e0", {"status": "done"})  # a done unit is not run again
    calls = []
    study.checkpoint = lambda seed, name: calls.append(("ckpt", seed, name))
    study.mined = lambda seed, name: calls.append(("mine", seed, name))
    study.evaluate = lambda seed, name, svm: calls.append(("eval", seed, name, svm))
    study.run()
    assert calls == [("ckpt", 1, "e0"), ("mine", 1, "e0"), ("ckpt", 1, "e0bn"), ("mine", 1, "e0bn"),
                     ("eval", 1, "e0bn", True), ("ckpt", 1, "e50"), ("mine", 1, "e50"), ("eval", 1, "e50", True),
                     ("ckpt", 1, "byol_cont"), ("eval", 1, "byol_cont", True), ("mine", 1, "byol_cont"),
                     ("ckpt", 1, "orl_init"), ("eval", 1, "orl_init", True), ("mine", 1, "orl_init")]


# -- report ----------------------------------------------------------------------------------
def _auc(v):
    return {"auc": v, "ci95": [v - 0.01, v + 0.01], "image_pairs": 100}


def _mine(step, auc):
    prec = {"precision": 0.1, "random": {"precision": 0.08}, "random_area_matched": {"precision": 0.09},
            "shared_class": {"precision": 0.2, "random_area_matched_precision": 0.15},
            "knn": {"share": 0.6}, "knn_random": {"share": 0.4}}
    return {"kind": "mine", "status": "done", "seconds": 2.0, "pairs": 100, "checkpoint_step": step,
            "pair_auc": {"ioa": _auc(auc), "iou": _auc(auc)}, "pair_auc_fixed": {"ioa": _auc(auc), "iou": _auc(auc)},
            "precision": {"ioa": prec, "iou": prec}}


def _eval(step, knn):
    probe = {"knn_balanced_acc": knn, "knn_balanced_acc_ci95": [knn - 0.02, knn + 0.02], "linear_balanced_acc": knn,
             "knn_acc": knn, "balanced_chance": 0.05, "majority_acc": 0.3, "linear_C": 0.1}
    return {"kind": "eval", "status": "done", "seconds": 1.0, "checkpoint_step": step,
            "label_free": {"view_top1": knn, "effective_rank": 40.0},
            "datasets": {d: {"probe": probe, "svm": {"map": 0.2}} for d in report.DATASET_NAMES}}


@pytest.fixture()
def results():
    u = {}
    settings = {**plan.MODES["quick"].settings(), "epochs": 2, "more_epochs": 1, "snapshots": [0, 2],
                "runs": ["byol_cont", "orl_init"], "variants": []}
    for s, d in ((0, 0.0), (1, 0.02)):
        for name, step, auc, knn in (("e0", 0, 0.56, 0.10), ("e0bn", 0, 0.57, 0.11), ("e2", 32, 0.60, 0.20),
                                     ("control", 500, 0.70, 0.40), ("byol_cont", 48, 0.61, 0.22 + d),
                                     ("orl_init", 48, 0.62, 0.21 + 3 * d)):
            u[f"mine/s{s}/{plan.mining_unit(name, settings)}"] = _mine(step, auc)  # runs: mined with RoIAlign
            u[f"eval/s{s}/{name}"] = _eval(step, knn)
        u[f"train/s{s}/byol@e2"] = {"kind": "train", "status": "done", "seconds": 60.0, "train_seconds": 50.0,
                                    "steps": 32, "loss": {"total": [3.0, 2.0]}}
    u["train/s1/orl"] = {"status": "error", "error": "MissingInput: the stage-1 pairs are missing"}
    return {"schema": 2, "mode": "quick", "settings": settings, "seeds": [0, 1],
            "machine": {"backbone": "resnet18", "device": "cpu", "steps_per_epoch": 16},
            "images": {"total": 20, "per_dataset": {"coco128": 10, "coco-mini": 10}},
            "labels": {"coco128": {"train": 4, "val": 4}, "coco-mini": {"train": 4, "val": 4}},
            "invocations": [{"started": "t", "command": "python -m benchmarks.study --quick", "load_avg": [1.0],
                             "wall_s": 100.0}], "units": u}


def test_report_from_hand_made_results(results):
    md = report.render_report({"quick": results}, {})
    lines = md.splitlines()
    assert "these numbers only check that the pipeline runs" in md
    # headline 2: the stage-1 end against random init, and the control, by interval
    expected = ("- End of stage 1 (2 epochs) against random init (BatchNorm statistics 0/1), fixed pairs:"
                " AUC: 0.600 against 0.560, higher, intervals do not overlap")
    assert any(line.startswith(expected) for line in lines)
    assert any("Positive control against" in line and "the metric can see good features" in line for line in lines)
    row = next(line for line in lines
               if line.startswith("| BYOL 2 epochs (end of stage 1) | 32 | 0.600 [0.590, 0.610]"))
    assert row
    # headline 3: ORL against BYOL continued, seed 0: kNN bal. 21 vs 22 -> -1.0 and a loss listed
    row = next(line for line in lines if line.startswith("| BYOL 2 ep. + ORL 1 ep., init from stage 1 |"))
    assert "21.0 (-1.0)" in row and "0.620 [0.610, 0.630] (+0.010)" in row
    assert "**Where ORL does not win here:**" in md
    # over seeds: ORL - BYOL continued kNN bal. = (-1, +3) points; per seed, means, spread, wins
    head = lines.index("#### ORL against BYOL at equal compute: a = BYOL 2 ep. + ORL 1 ep., init from stage 1; "
                       "b = BYOL 2 ep. + BYOL 1 ep. (continued)")
    row = next(line for line in lines[head:] if line.startswith("| kNN bal. acc. |"))
    assert row == ("| kNN bal. acc. | 21.0 / 22.0 (-1.0) | 27.0 / 24.0 (+3.0) | 24.0 / 23.0 | +1.0 ± 2.8 | "
                   "-1.0 / +3.0 | 1/2 |")
    row = next(line for line in lines[head:] if line.startswith("| pair AUC (fixed) |"))
    assert row.startswith("| pair AUC (fixed) | 0.620 / 0.610 (+0.010) | 0.620 / 0.610 (+0.010) | 0.620 / 0.610 |")
    assert any(line.startswith("#### BYOL against random init (data BatchNorm statistics): a = BYOL 2 epochs (end of "
                               "stage 1); b = random init, BatchNorm statistics from the photos") for line in lines)
    assert "`train/s1/orl`: MissingInput: the stage-1 pairs are missing" in md
    assert "**Partial:**" in md  # variants and mining of runs are missing from the hand-made file


def test_report_paired_differences_need_per_pair_values(results):
    assert "Paired differences" not in report.render_report({"quick": results}, {})
    u = results["units"]
    pp = {"query": [0, 0, 1, 2], "neighbour": [1, 2, 0, 0], "auc": [0.5, 0.6, 0.7, 0.5],
          "auc_area_matched": [0.5, None, 0.6, 0.5]}
    u["mine/s0/byol_cont+roi_align"]["pair_auc_fixed"]["ioa"]["per_pair"] = pp
    u["mine/s0/orl_init+roi_align"]["pair_auc_fixed"]["ioa"]["per_pair"] = {
        **pp, "auc": [0.6, 0.7, 0.8, 0.6], "auc_area_matched": [0.6, 0.7, None, 0.5]}
    lines = report.render_report({"quick": results}, {}).splitlines()
    row = next(line for line in lines if line.startswith("| BYOL 2 ep. + ORL 1 ep., init from stage 1 | BYOL 2 ep. "
                                                         "+ BYOL 1 ep."))
    # every image pair +0.1; area-matched: two pairs defined in both, +0.1 and 0.0
    assert "+0.1000 [+0.1000, +0.1000] (above 0); higher on 100% of 4 image pairs" in row
    assert "+0.0500" in row and "of 2 image pairs" in row


def test_plots_and_write_report(results, tmp_path):
    (tmp_path / "study_quick.json").write_text(json.dumps(results))
    doc = report.write_report(tmp_path, tmp_path / "docs" / "RESULTS.md")
    text = doc.read_text()
    for kind in ("auc", "probe", "loss"):
        assert (tmp_path / f"study_quick_{kind}.png").stat().st_size > 10_000
        assert f"](../study_quick_{kind}.png)" in text
    assert "No CPU study has been run yet" in text


def test_expected_units_cover_every_planned_unit(results):
    keys = report.expected_units(results)
    assert "mine/s1/control" in keys and "eval/s0/e2" in keys and "train/s1/orl_init" in keys
    assert "mine/s0/orl_init+roi_align" in keys and "mine/s0/e2+roi_align" in keys
    assert len(keys) == len(set(keys))


def test_quick_mode_is_the_pipeline_check_cli(tmp_path):
    """The command line refuses unknown names before any work starts."""
    from benchmarks.study.runner import main

    assert main(["--quick", "--runs", "nope", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "study_quick.json").exists()
    assert Path(report.__file__).parent.name == "study"


def test_kept_checkpoint_is_float16_and_restores_to_the_rounded_weights(tmp_path):
    """The final stage-1 checkpoint kept in git: half the bytes, and the restored copy every
    later unit reads equals the kept weights exactly (so all runs start from one copy)."""
    import torch

    from orl.checkpoint import load_checkpoint, load_model, save_checkpoint
    from orl.config import get_preset
    from orl.models import build_model

    cfg = get_preset("tiny")
    model = build_model(cfg.model, "byol")
    src = tmp_path / "e2.pt"
    save_checkpoint({"stage": "byol", "config": cfg.to_dict(), "model": model.state_dict(),
                     "optimizer": {"state": {}}, "position": {"global_step": 7}}, src)
    kept, back = tmp_path / "keep" / "e2.pt", tmp_path / "snap" / "e2.pt"
    kept.parent.mkdir()
    units.keep_checkpoint(src, kept)
    ck = load_checkpoint(kept)
    assert "optimizer" not in ck and ck["position"]["global_step"] == 7
    floats = [v for v in ck["model"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert kept.stat().st_size < 0.6 * src.stat().st_size
    units.restore_checkpoint(kept, back)
    restored, _, _ = load_model(back)
    for k, v in restored.state_dict().items():
        orig = model.state_dict()[k]
        assert v.dtype == orig.dtype
        if v.is_floating_point():
            assert torch.equal(v, ck["model"][k].float())
            assert torch.allclose(v, orig, rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(v, orig)


# -- the short mode's report and the estimate ---------------------------------------------------------
def _short_results():
    """Three seeds of a short-mode file: every mining with RoIAlign, no "+" units."""
    settings = plan.MODES["short"].settings()
    u = {}
    pp = {"query": [0, 0, 1, 2], "neighbour": [1, 2, 0, 0], "auc": [0.5, 0.6, 0.7, 0.5],
          "auc_area_matched": [0.5, 0.6, 0.7, 0.5]}
    for s in (0, 1, 2):
        for name, step, auc, knn in (("e0", 0, 0.55, 0.10), ("e0bn", 0, 0.56, 0.11), ("e50", 800, 0.60, 0.20 + s / 100),
                                     ("byol_cont", 304, 0.61, 0.22), ("orl_init", 304, 0.62, 0.21 + s / 50)):
            m = _mine(step, auc)
            # orl_init: +0.05 on every image pair in seed 0, -0.05 in the others
            shift = (0.05 if s == 0 else -0.05) if name == "orl_init" else 0.0
            m["pair_auc_fixed"]["ioa"]["per_pair"] = {**pp, "auc": [x + shift for x in pp["auc"]]}
            u[f"mine/s{s}/{name}"] = m
            u[f"eval/s{s}/{name}"] = _eval(step, knn)
            train = {"e0": "byol@e0", "e50": "byol@e50"}.get(name, name)
            u[f"train/s{s}/{train}"] = {"kind": "train", "status": "done", "seconds": 1.0}
    return {"schema": 2, "mode": "short", "settings": settings, "seeds": [0, 1, 2], "machine": {},
            "images": {}, "labels": {}, "invocations": [], "units": u}


def test_short_report_three_seed_section():
    lines = report.render_report({"short": _short_results()}, {}).splitlines()
    assert any(line.startswith("> Every mining in this mode uses RoIAlign RoI features") for line in lines)
    assert any(line.startswith("Pair AUC here comes from RoIAlign RoI features, like every mining in this mode; the "
                               "end of stage 1: 0.600") for line in lines)
    head = lines.index("#### ORL against BYOL at equal compute: a = BYOL 50 ep. + ORL 19 ep., init from stage 1; "
                       "b = BYOL 50 ep. + BYOL 19 ep. (continued)")
    row = next(line for line in lines[head:] if line.startswith("| kNN bal. acc. |"))
    # orl_init 21, 23, 25 against 22: -1, +1, +3
    assert row == ("| kNN bal. acc. | 21.0 / 22.0 (-1.0) | 23.0 / 22.0 (+1.0) | 25.0 / 22.0 (+3.0) | 23.0 / 22.0 | "
                   "+1.0 ± 2.0 | -1.0 / +3.0 | 2/3 |")
    paired_rows = [line for line in lines[head:] if line.startswith(("| 0 |", "| 1 |", "| 2 |"))][:3]
    assert paired_rows[0].startswith("| 0 | +0.0500 [+0.0500, +0.0500] (above 0); higher on 100% of 4 image pairs")
    assert paired_rows[2].startswith("| 2 | -0.0500 [-0.0500, -0.0500] (below 0)")
    stage1 = lines.index("#### BYOL against random init (data BatchNorm statistics): a = BYOL 50 epochs (end of stage "
                         "1); b = random init, BatchNorm statistics from the photos")
    row = next(line for line in lines[stage1:] if line.startswith("| pair AUC (fixed) |"))
    assert "| 0.600 / 0.560 | +0.040 ± 0.000 | +0.040 / +0.040 | 3/3 |" in row
    assert not any("**Partial:**" in line for line in lines)  # every planned unit is in the file


def test_estimate_subtracts_nested_units_and_scales_by_steps():
    from benchmarks.study import estimate

    def rec(end, seconds, **kw):
        return {"status": "done", "seconds": seconds, "recorded_at": f"2026-12-01 10:{end // 60:02d}:{end % 60:02d}",
                **kw}

    long = {"settings": {**plan.MODES["long"].settings(), "snapshots": [0, 2], "epochs": 2, "more_epochs": 1},
            "machine": {"steps_per_epoch": 16}, "units": {
                # stage 1 to epoch 2 (32 steps, 64 s) trained inside its mining (100 s, 30 of them selective search)
                "train/s0/byol@e2": rec(200, 64.0),
                "mine/s0/e2": rec(210, 100.0, mine_params={"roi_mode": "crop", "ss_max_side_px": 500},
                                  stage_seconds={"selective_search": 30.0}),
                "mine/s0/e2+roi_align": rec(300, 10.0, mine_params={"roi_mode": "roi_align", "ss_max_side_px": 500},
                                            stage_seconds={"selective_search": 0.2}),
                "train/s0/orl": rec(400, 48.0), "eval/s0/orl": rec(405, 53.0, stage_seconds={"svm_coco128": 1.0},
                                                                   datasets={"coco128": {}})}}
    own = {c["key"]: c["own"] for c in estimate.computations(long["units"])}
    assert own["mine/s0/e2"] == pytest.approx(36.0) and own["eval/s0/orl"] == pytest.approx(5.0)
    short = {**plan.MODES["short"].settings(), "epochs": 4, "snapshots": [0, 4], "more_epochs": 2,
             "runs": ["orl"]}
    rows = {r["key"]: r for r in estimate.estimate(short, (0, 1), long)}
    assert rows["train/s0/byol@e4"]["median_s"] == pytest.approx(128.0)  # 2 s per step, 64 steps
    assert rows["train/s0/orl"]["median_s"] == pytest.approx(96.0)  # 1.5 s per step, 64 steps (ORL's own rate)
    assert rows["eval/s0/orl"]["median_s"] == pytest.approx(5.0)
    # RoIAlign minings: 9.8 s each (less the 0.2 s of reading cached proposals), and the one selective
    # search (30 s) with the first mining of the work folder
    assert rows["mine/s0/e0"]["median_s"] == pytest.approx(39.8)
    assert rows["mine/s1/e0"]["median_s"] == pytest.approx(9.8)
    assert rows["train/s0/byol@e0"]["median_s"] == 0.0  # no steps
    assert rows["train/s0/e0bn"]["median_s"] is None  # nothing comparable recorded
    text = estimate.render("short", list(rows.values()), {"mine/s0/e0": "done"})
    assert "seed 0 total" in text and "units without an estimate" in text
    # another scale (the quick mode's tiny preset): no estimates at all
    assert all(r["median_s"] is None for r in estimate.estimate(plan.MODES["quick"].settings(), (0,), long))


def test_dry_run_lists_units_and_writes_nothing(tmp_path, capsys):
    from benchmarks.study.runner import main

    timings = tmp_path / "long.json"
    timings.write_text(json.dumps({"settings": plan.MODES["long"].settings(), "machine": {}, "units": {}}))
    assert main(["--mode", "short", "--dry-run", "--out", str(tmp_path / "out"), "--timings", str(timings)]) == 0
    out = capsys.readouterr().out
    assert "train/s2/orl_init" in out and "short total (45 units)" in out
    assert not (tmp_path / "out").exists()
