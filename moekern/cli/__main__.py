"""`python -m moekern.cli`, as `python -m moekern`."""

import sys

from moekern.cli import main

sys.exit(main())
