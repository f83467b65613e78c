"""`python -m uno_engine.train ...` (and `accelerate launch -m uno_engine.train ...`)."""

from uno_engine.train.cli import main

raise SystemExit(main())
