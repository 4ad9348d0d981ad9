"""`python -m lambda_eclipse …` runs the command line (generate, interpolate, check)."""

import sys

from .core.cli import main

sys.exit(main())
