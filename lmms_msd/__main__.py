"""`python -m lmms_msd` runs the `lmms-msd` command line."""

import sys

from lmms_msd.commands.cli import main

sys.exit(main())
