"""docs/PERFORMANCE.md is generated from the committed results files (benchmarks/performance_table.py)."""

from benchmarks.performance_table import DOC, render


def test_performance_page_is_what_the_results_files_give():
    assert DOC.read_text() == render(), "run: python benchmarks/performance_table.py"
