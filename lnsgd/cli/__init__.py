"""The ``lnsgd`` command line: thin Typer commands over the library.

Each command parses its arguments, loads and validates the recipe, calls one library
function, and turns ``LnsgdError`` into one line on stderr and a non-zero exit
(``app.friendly``). Exit codes: 1 bad input or failed run, 2 usage, 3 diverged,
130 interrupted. The commands live by what they do: ``run`` (commands that write run
folders), ``measure``, ``report`` and ``sweep``; importing this package registers them all.
"""

from lnsgd.cli import run, measure, report, sweep  # noqa: F401, I001  (in this order: the order of --help)
from lnsgd.cli.app import app


def main() -> None:
    """The console-script entry point. Usage errors (a missing argument, an unknown option or
    command) are one line too, like every other error, with click's exit code (2)."""
    import sys

    import typer

    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # Typer ships its own copy of click, whose exception classes are not public:
        # recognize click's usage errors by their interface (exit_code, format_message).
        if not (isinstance(getattr(e, "exit_code", None), int) and callable(getattr(e, "format_message", None))):
            raise
        if not e.format_message():  # `lnsgd` alone: the help was printed
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        command = ctx.command_path if ctx is not None else "lnsgd"
        print(f"error: {e.format_message()} (see `{command} --help`)", file=sys.stderr)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
