"""Reading a run folder's metrics.csv and monitor.csv back (orl.runlog): what the API serves."""

from orl.runlog import METRICS_COLUMNS, MONITOR_COLUMNS, metrics_row, read_metrics, read_monitor


def _write(path, header, rows):
    path.write_text("\n".join([",".join(header), *(",".join(r) for r in rows)]) + "\n")


def test_read_metrics_keeps_the_last_row_of_a_redone_step_and_thins_evenly(tmp_path):
    rows = [metrics_row({"epoch": 0, "step": s, "global_step": s, "lr": 0.1, "loss": 10.0 - s}) for s in range(1, 11)]
    # A resumed run redid steps 9 and 10 with other losses; a kill cut a line short.
    rows += [metrics_row({"epoch": 0, "step": s, "global_step": s, "lr": 0.1, "loss": 100.0 + s}) for s in (9, 10)]
    _write(tmp_path / "metrics.csv", list(METRICS_COLUMNS), [list(r.values()) for r in rows] + [["0", "3"]])
    got, n = read_metrics(tmp_path)
    assert n == 10 and [r["global_step"] for r in got] == list(range(1, 11))
    assert got[0]["loss"] == 9.0 and got[-1]["loss"] == 110.0 and isinstance(got[0]["global_step"], int)
    assert got[0]["loss_intra"] is None  # a branch that did not run: "" in the file
    thin, n = read_metrics(tmp_path, max_points=4)
    assert n == 10 and [r["global_step"] for r in thin] == [1, 4, 7, 10]


def test_read_monitor_and_missing_files(tmp_path):
    assert read_monitor(tmp_path) == [] and read_metrics(tmp_path) == ([], 0)
    _write(tmp_path / "monitor.csv", MONITOR_COLUMNS, [["1", "2", "0.25", "0.125", "3.5", "7", "8", "0.4"],
                                                     ["2", "4", "nan", "0.125", "4.0", "7", "8", "0.4"]])
    rows = read_monitor(tmp_path)
    assert rows[0] == {"epoch": 1, "global_step": 2, "view_top1": 0.25, "view_top1_chance": 0.125,
                       "effective_rank": 3.5, "effective_rank_max": 7, "images": 8, "seconds": 0.4}
    assert rows[1]["view_top1"] is None  # not a finite number: JSON has no NaN
