import sys

from orl.cli import main

sys.exit(main())
