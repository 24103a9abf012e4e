"""``python -m control_plane``: hands over to the command line in ``cli``."""

from control_plane.cli import main

raise SystemExit(main())
