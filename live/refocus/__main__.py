"""``python -m live.refocus``: the command line (`live.refocus.cli`)."""

from live.refocus.cli import main

raise SystemExit(main())
