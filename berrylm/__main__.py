"""`python -m berrylm ...`: the same command line as the `berry` console script (berrylm/cli.py)."""

from berrylm.cli import run

run()
