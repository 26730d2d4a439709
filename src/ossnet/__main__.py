"""`python -m ossnet ...` (and `torchrun -m ossnet train ...`) runs the command-line interface."""

from ossnet.cli import main

raise SystemExit(main())
