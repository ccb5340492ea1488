"""The evidence study: does our ORL beat BYOL on real scene photos, and are the mined pairs objects?

One command runs every unit of one mode and writes the raw results as JSON after every unit
(benchmarks/results/study_<mode>.json); docs/RESULTS.md and its plots are generated from
those files alone. Rerunning the same command resumes.

  python -m benchmarks.study --mode long     # one seed, 3,000 stage-1 steps (several hours on 2 cores)
  python -m benchmarks.study --mode short    # three seeds at 800 stage-1 steps
  python -m benchmarks.study --quick         # pipeline check, under 15 minutes; numbers mean nothing
  python -m benchmarks.study --report-only   # regenerate docs/RESULTS.md from the JSON
  python -m benchmarks.study --mode short --dry-run   # the units, done or not, estimated minutes

Modules, in reading order:
  plan.py     what is run: modes, the runs after stage 1, mining options, the units in order (pure data)
  estimate.py minutes per unit, from the long mode's recorded timings (--dry-run)
  data.py     the photos (one symlink folder over both datasets) and their labels
  store.py    the results file: atomic, resumable, optionally committed after every unit
  control.py  the supervised positive control
  units.py    the units of work and their order
  report.py   docs/RESULTS.md and the plots, from the JSON only
  runner.py   the command line
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "RESULTS.md"
DATA = REPO.parent / "shared" / "data"
