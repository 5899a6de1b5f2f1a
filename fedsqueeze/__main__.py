"""``python -m fedsqueeze`` runs the command line."""

import sys

from fedsqueeze.cli import main

if __name__ == "__main__":  # guarded: benches start worker processes with spawn
    sys.exit(main())
