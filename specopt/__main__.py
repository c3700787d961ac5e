"""``python -m specopt ...`` runs the ``specopt`` command (also under torchrun)."""

import sys

from specopt.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
