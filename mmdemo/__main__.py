"""``python -m mmdemo``: the command-line interface (see :mod:`mmdemo.cli`)."""

from mmdemo.cli import main

raise SystemExit(main())
