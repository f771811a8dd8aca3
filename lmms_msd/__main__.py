"""`python -m lmms_msd` runs the `lmms-msd` command line."""

import sys

from lmms_msd.cli import main

sys.exit(main())
