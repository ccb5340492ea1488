import os
import sys

# OpenMP threads that wait for work sleep instead of spinning: on a shared 2-core machine a
# spinning pool steals the core that the DataLoader workers need (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .runner import main  # noqa: E402

sys.exit(main())
