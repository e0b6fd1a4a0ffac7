"""`python -m motfusion`: the same command line as `motfusion`."""

import sys

from motfusion.cli import main

sys.exit(main())
