"""`python -m runners ...`: the `steer-heal` command line."""

from runners.entry import run

run()
