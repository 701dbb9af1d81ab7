"""`python -m memplan`."""

from .cli import main

raise SystemExit(main())
