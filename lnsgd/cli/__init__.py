"""The ``lnsgd`` command line: thin Typer commands over the library.

Each command parses its arguments, loads and validates the recipe, calls one library
function, and turns ``LnsgdError`` into one line on stderr and a non-zero exit
(``app.friendly``). Exit codes: 1 bad input or failed run, 2 usage, 3 diverged,
130 interrupted. The commands live by what they do: ``run`` (commands that write run
folders), ``measure``, ``report`` and ``sweep``; importing this package registers them all.
"""

from lnsgd.cli import run, measure, report, sweep  # noqa: F401, I001  (in this order: the order of --help)
from lnsgd.cli.app import app


def main() -> None:  # console-script entry point
    app()


__all__ = ["app", "main"]
