import sys

from moekern.cli import main

sys.exit(main())
