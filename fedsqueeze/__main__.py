"""``python -m fedsqueeze`` runs the command line."""

import sys

from fedsqueeze.cli import main

sys.exit(main())
