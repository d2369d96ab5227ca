"""`python -m bhyvepy` runs the bhyve(8)-compatible front end."""

from bhyvepy.cli import main

raise SystemExit(main())
