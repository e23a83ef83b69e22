"""``python -m biounet`` runs the command-line interface."""

import sys

from biounet.cli import main

sys.exit(main())
