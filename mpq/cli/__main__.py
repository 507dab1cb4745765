"""``python -m mpq.cli``."""

from mpq.cli.main import main

raise SystemExit(main())
