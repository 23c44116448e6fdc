"""``python -m engine.train_volume``: the command line (`engine.train_volume.cli`)."""

import sys

from engine.train_volume.cli import main

sys.exit(main())
