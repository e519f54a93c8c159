"""`python -m loadtest.reliability`: see loadtest/reliability/cli.py."""

from loadtest.reliability.cli import main

raise SystemExit(main())
