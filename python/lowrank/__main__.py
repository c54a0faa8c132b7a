"""``python -m lowrank <command>``: the command line (:mod:`lowrank.cli`); alone, it prints
what was built and what can run here."""

from lowrank.cli import main

raise SystemExit(main())
