"""The study's own code (benchmarks/study.py): seed aggregation, the report, resumability.

The metrics it calls (pair precision, probe, SVM) are tested in test_metrics.py and
test_evaluate.py; these tests cover what the study adds on top, on hand-made inputs.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", REPO / "benchmarks" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["study"] = mod
    spec.loader.exec_module(mod)
    return mod


# -- aggregation over seeds -----------------------------------------------------------------
def test_aggregate_mean_and_sample_std(study):
    a = study.aggregate([0.5, 0.6, None, 0.7])
    assert a["n"] == 3 and a["values"] == [0.5, 0.6, 0.7]
    assert a["mean"] == pytest.approx(0.6)
    assert a["std"] == pytest.approx(0.1)  # ddof 1: sqrt((0.01 + 0 + 0.01) / 2)
    one = study.aggregate([0.3])
    assert one["mean"] == pytest.approx(0.3) and one["std"] is None
    assert study.aggregate([None]) == {"mean": None, "std": None, "n": 0, "values": []}


def test_paired_differences_and_verdicts(study):
    p = study.paired({0: 0.5, 1: 0.6, 2: 0.4}, {0: 0.4, 1: 0.5, 2: 0.45, 3: 0.9})
    assert p["seeds"] == [0, 1, 2] and p["n"] == 3  # seed 3 has no partner
    assert p["diff_mean"] == pytest.approx((0.1 + 0.1 - 0.05) / 3)
    assert (p["wins"], p["losses"]) == (2, 1)
    assert study.verdict(p) == "mixed: higher in 2, lower in 1, equal in 0 of 3 seeds"
    assert study.verdict(study.paired({0: 1.0, 1: 1.0}, {0: 0.0, 1: 0.5})) == "higher in all 2 seeds"
    assert study.verdict(study.paired({0: 0.0}, {0: 1.0})) == "lower in all 1 seeds"
    assert study.verdict(study.paired({0: None}, {0: 1.0})) == "not measured"
    assert study.fmt_diff(study.paired({0: 0.52, 1: 0.50}, {0: 0.50, 1: 0.50})) == "+1.0 ± 1.4 (1/2)"


def test_seed_values_and_dataset_mean(study):
    units = {
        "eval/s0/orl": {"status": "done", "datasets": {"a": {"knn_acc": 0.2}, "b": {"knn_acc": 0.4}}},
        "eval/s1/orl": {"status": "done", "datasets": {"a": {"knn_acc": 0.3}, "b": {"knn_acc": None}}},
        "eval/s2/orl": {"status": "error", "error": "x"},
        "eval/s0/orl_init": {"status": "done", "datasets": {"a": {"knn_acc": 0.9}, "b": {"knn_acc": 0.9}}},
    }
    v = study.seed_values(units, "eval", "orl", lambda r: study.dataset_mean(r, "knn_acc"))
    assert v == {0: pytest.approx(0.3), 1: None}  # failed seed 2 left out; a missing dataset -> None


def test_mutual_pairs_hand_made(study):
    fq = np.eye(3, dtype=np.float32)
    # neighbour box 0 is nearest to query boxes 0 and 1 (a many-to-one the authors' rule keeps)
    fk = np.array([[0.9, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    ij, s = study.mutual_pairs(fq, fk, ratio=1.0)
    assert ij.tolist() == [[2, 1], [0, 0]]  # query 1's best (k0) prefers query 0: dropped
    assert s.tolist() == pytest.approx([1.0, 0.9])
    ij, _ = study.mutual_pairs(fq, fk, ratio=0.1)  # cap max(1, int(0.1 * 3)) = 1, best first
    assert ij.tolist() == [[2, 1]]
    assert study.mutual_pairs(fq[:0], fk, 1.0)[0].shape == (0, 2)


def test_loss_curves_dedupe_resumed_steps(study, tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,step,global_step,lr,momentum,loss,loss_global,loss_intra,loss_inter,images_per_s,time\n"
        "0,1,1,0.1,0.99,4.0,2.0,1.0,1.0,8.0,0\n"
        "0,2,2,0.1,0.99,9.9,9.9,,,8.0,0\n"    # killed run: step 2 logged, then redone
        "0,2,2,0.1,0.99,3.0,2.0,1.0,,4.0,0\n"
        "1,1,3,0.1,0.99,2.0,2.0,,,8.0,0\n")
    curves, seconds = study.loss_curves(csv, batch=8)
    assert curves["total"] == [pytest.approx(3.5), pytest.approx(2.0)]
    assert curves["intra"] == [pytest.approx(1.0), None]
    assert curves["inter"] == [pytest.approx(1.0), None]
    assert seconds == pytest.approx(8 / 8 + 8 / 4 + 8 / 8)


# -- resumability bookkeeping ----------------------------------------------------------------
def test_store_skips_done_units_and_records_errors(study, tmp_path):
    path = tmp_path / "study_quick.json"
    store = study.ResultsStore(path, "quick", {"epochs": 2})
    calls = []

    def ok():
        calls.append("ok")
        return {"value": np.float32(0.5)}

    def boom():
        raise ValueError("broken input")

    assert store.run_unit("train/s0/a", ok, log=lambda m: None)
    assert not store.run_unit("train/s0/b", boom, log=lambda m: None)
    assert store.errors == ["train/s0/b"]
    saved = json.loads(path.read_text())  # written after every unit
    assert saved["units"]["train/s0/a"]["status"] == "done" and saved["units"]["train/s0/a"]["value"] == 0.5
    assert saved["units"]["train/s0/b"] == {**saved["units"]["train/s0/b"], "status": "error",
                                            "error": "ValueError: broken input"}

    again = study.ResultsStore(path, "quick", {"epochs": 2})  # a rerun
    assert again.run_unit("train/s0/a", ok, log=lambda m: None) and calls == ["ok"]  # skipped
    assert again.run_unit("train/s0/a", ok, outputs_exist=False, log=lambda m: None) and calls == ["ok", "ok"]
    assert again.run_unit("train/s0/b", ok, log=lambda m: None)  # a failed unit is retried
    assert not again.run_unit("train/s0/c", ok, out_of_time=True, log=lambda m: None)
    assert again.skipped == ["train/s0/c"] and "train/s0/c" not in again.units


def test_store_refuses_other_settings(study, tmp_path):
    path = tmp_path / "study.json"
    study.ResultsStore(path, "full", {"epochs": 5}).save()
    with pytest.raises(study.SettingsMismatch, match="--fresh"):
        study.ResultsStore(path, "full", {"epochs": 6})
    assert study.ResultsStore(path, "full", {"epochs": 6}, fresh=True).units == {}


@pytest.mark.parametrize("mode", ["full", "quick", "gpu"])
def test_every_mode_resumes_its_own_file(study, tmp_path, mode):
    settings = study.MODES[mode].settings()
    study.ResultsStore(tmp_path / "r.json", mode, settings).save()
    assert study.ResultsStore(tmp_path / "r.json", mode, study.MODES[mode].settings()).data["settings"] == settings


def test_mode_settings_leave_out_seeds(study):
    import dataclasses

    m = study.MODES["full"]
    assert m.settings() == dataclasses.replace(m, seeds=(0, 1, 2, 3)).settings()  # seeds can be added
    assert m.settings() != dataclasses.replace(m, epochs=m.epochs + 1).settings()


# -- report ----------------------------------------------------------------------------------
def _eval(knn, lin, svm):
    ds = {"train_crops": 10, "val_crops": 8, "train_images": 4, "val_images": 4, "svm_classes": 2,
          "svm_classes_small": 1, "majority_acc": 0.25, "svm_chance_map": 0.3}
    return {"kind": "eval", "status": "done", "seconds": 1.0, "cpu_seconds": 1.0,
            "datasets": {"coco128": {**ds, "knn_acc": knn, "linear_acc": lin, "svm_map": svm},
                         "coco-mini": {**ds, "knn_acc": knn + 0.1, "linear_acc": lin, "svm_map": svm}}}


def _mine(prec, rand):
    part = {"pairs": 100, "precision": prec, "top1_precision": prec, "random_precision": rand, "lift": prec / rand,
            "knn_share": 0.6, "knn_random_share": 0.4, "knn_image_pairs": 50, "labelled_images": 10,
            "iou_threshold": 0.5}
    return {"kind": "mine", "status": "done", "seconds": 2.0, "pairs": 100,
            "union": {"iou": part, "ioa": part}, "per_dataset": {"coco128": {"iou": part, "ioa": part}, "coco-mini": None}}


def _train(loss):
    return {"kind": "train", "status": "done", "seconds": 60.0, "train_seconds": 60.0,
            "loss": {"total": [loss, loss - 1], "global": [loss, loss - 1], "intra": [None, None], "inter": [None, None]}}


@pytest.fixture()
def results(study):
    units = {}
    for s, d in ((0, 0.0), (1, 0.02)):
        units[f"train/s{s}/byol_N"] = _train(3.0)
        units[f"train/s{s}/byol_2N"] = _train(2.5)
        units[f"train/s{s}/orl"] = _train(6.0)
        units[f"mine/s{s}/ep0"] = _mine(0.05, 0.04)
        units[f"mine/s{s}/ep2"] = _mine(0.10 + d, 0.04)
        units[f"mine/s{s}/mutual"] = _mine(0.12 + d, 0.04)
        units[f"eval/s{s}/random_init"] = _eval(0.2, 0.2, 0.1)
        units[f"eval/s{s}/byol_N"] = _eval(0.4, 0.4, 0.3)
        units[f"eval/s{s}/byol_2N"] = _eval(0.5 + d, 0.5, 0.4)
        units[f"eval/s{s}/orl"] = _eval(0.45 + 5 * d, 0.6, 0.4)  # loses kNN in seed 0, wins in seed 1
    units["eval/s1/orl_init"] = {"kind": "eval", "status": "error", "error": "MissingInput: no checkpoint"}
    return {"schema": 1, "mode": "full", "settings": {**study.MODES["full"].settings(), "epochs": 2,
                                                       "snapshots": [0, 2]},
            "seeds": [0, 1], "machine": {"backbone": "resnet18", "device": "cpu", "cpu_count": 2},
            "images": {"total": 20, "per_dataset": {"coco128": 10, "coco-mini": 10}},
            "labels": {"coco128": {"train": 4, "val": 4}, "coco-mini": {"train": 4, "val": 4}},
            "invocations": [{"started": "t", "command": "python benchmarks/study.py", "load_avg": [1.0, 1.0, 1.0],
                             "wall_s": 100.0}], "units": units, "skipped": ["eval/s1/orl_mutual"]}


def test_report_tables_from_hand_made_results(study, results):
    md = study.render_report({"full": results}, {})
    assert "The full study has not been run yet" not in md
    # representation table: mean over datasets, then over seeds: byol_2N kNN = (0.55, 0.57)
    row = next(l for l in md.splitlines() if l.startswith("| BYOL 2N | 4 |"))
    assert "56.0 ± 1.4" in row and "50.0 ± 0.0" in row and "40.0 ± 0.0" in row
    assert "| chance: majority class (probe), positive rate (SVM) | | | 25.0 | 25.0 | 30.0 |" in md
    # pair table: IoU precision of stage 1 after 2 epochs, and its random baseline
    row = next(l for l in md.splitlines() if l.startswith("| stage 1 after 2 epochs (default"))
    assert "| 11.00 ± 1.41 | 4.00 ± 0.00 |" in row  # pair precision: 2 decimals (values near 0)
    # paired comparison: ORL - BYOL 2N kNN: seed 0: 0.50 - 0.55 = -5, seed 1: 0.60 - 0.57 = +3 points
    row = next(l for l in md.splitlines() if l.startswith("| BYOL N + ORL N, random init (authors) | BYOL 2N |"))
    assert "-1.0 ± 5.7 (1/2)" in row
    assert "**Where ORL does not win**" in md
    assert "kNN acc. (GT crops): -1.0 ± 5.7 (1/2), mixed: higher in 1, lower in 1, equal in 0 of 2 seeds" in md
    assert "`eval/s1/orl_init`: MissingInput: no checkpoint" in md
    assert "`eval/s1/orl_mutual`: not run (time budget)" in md
    assert "n/a" in md  # coco-mini had no pair precision


def test_report_banner_and_plots(study, results, tmp_path):
    quick = {**results, "mode": "quick"}
    plots = study.make_plots(quick, tmp_path / "results", tmp_path / "docs")
    assert set(plots) == {"loss", "precision", "probe"}
    for kind, rel in plots.items():
        assert rel == f"../results/study_quick_{kind}.png"
        assert (tmp_path / "results" / f"study_quick_{kind}.png").stat().st_size > 10_000
    md = study.render_report({"quick": quick}, {"quick": plots})
    assert "The full study has not been run yet" in md
    assert "these numbers only check that the pipeline runs" in md
    assert "![probe accuracy per method](../results/study_quick_probe.png)" in md


def test_write_report_regenerates_from_json(study, results, tmp_path):
    (tmp_path / "study.json").write_text(json.dumps(results))
    doc = study.write_report(tmp_path, tmp_path / "RESULTS.md")
    text = doc.read_text()
    assert text.startswith("# Results:") and "## Full study" in text
    assert (tmp_path / "study_full_probe.png").exists()


def test_runs_and_variants_can_be_added_to_a_result(study, tmp_path):
    import dataclasses

    m = dataclasses.replace(study.MODES["full"], runs=("byol_N", "orl"))
    study.ResultsStore(tmp_path / "r.json", "full", m.settings()).save()
    more = dataclasses.replace(m, runs=("orl_mutual", "orl"))
    store = study.ResultsStore(tmp_path / "r.json", "full", more.settings())
    assert store.data["settings"]["runs"] == ["byol_N", "orl", "orl_mutual"]
    everything = dataclasses.replace(m, runs=None)
    assert study.ResultsStore(tmp_path / "r.json", "full", everything.settings()).data["settings"]["runs"] is None
    with pytest.raises(study.SettingsMismatch):  # what a unit means may not change
        study.ResultsStore(tmp_path / "r.json", "full", dataclasses.replace(m, epochs=9).settings())


def test_report_flags_units_whose_inputs_were_recomputed(study):
    units = {
        "train/s0/byol_N": {"status": "done", "recorded_at": "2026-01-01 12:05:00"},  # recomputed
        "mine/s0/ep4": {"status": "done", "recorded_at": "2026-01-01 12:06:00"},
        "eval/s0/byol_N": {"status": "done", "recorded_at": "2026-01-01 12:01:00"},  # before it
        "train/s0/orl": {"status": "done", "recorded_at": "2026-01-01 12:07:00"},
        "train/s0/orl_init": {"status": "done", "recorded_at": "2026-01-01 12:00:00"},
        "mine/s0/mutual": {"status": "done", "recorded_at": "2026-01-01 12:05:30"},
    }
    assert study.recomputed_inputs(units, 4) == [
        ("eval/s0/byol_N", "train/s0/byol_N"), ("mine/s0/mutual", "mine/s0/ep4"),
        ("train/s0/orl_init", "mine/s0/ep4"), ("train/s0/orl_init", "train/s0/byol_N")]
