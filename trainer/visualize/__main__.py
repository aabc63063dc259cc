"""``python -m trainer.visualize RUN_DIR [--target NAME] [--weights PATH] ...`` (see :mod:`trainer.visualize.cli`)."""

import sys

from trainer.visualize.cli import main

sys.exit(main())
