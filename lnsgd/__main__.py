"""``python -m lnsgd``: the command line (sweeps start their runs this way)."""

from lnsgd.cli import main

main()
