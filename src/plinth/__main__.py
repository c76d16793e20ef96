"""`python -m plinth ...` is the same as the `plinth` command (and what torchrun launches)."""

from plinth.cli import main

raise SystemExit(main())
