"""``python -m lazymig``: the same as the ``lazymig`` console script."""

from lazymig.cli import main

raise SystemExit(main())
