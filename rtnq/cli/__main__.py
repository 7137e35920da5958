"""`python -m rtnq.cli`: the same as the `rtnq` console script."""

from rtnq.cli import main

main()
