"""The Typer app and what every command shares: consoles, options, errors as exit codes.

``friendly`` is the one place where library errors become one line on stderr and an
exit code: 1 bad input or failed run, 2 usage, 3 diverged, 130 interrupted.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from lnsgd.errors import DivergedError, LnsgdError, RunInterrupted

app = typer.Typer(
    help="Label-noise SGD experiments: train, build poor minimizers, measure sharpness, plot.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



console = Console()



err_console = Console(stderr=True)



def recipe_arg(example: str):
    """The recipe argument, its help naming a recipe that fits the command (``recipes/`` has one per command)."""
    return Annotated[Path, typer.Argument(help=f"recipe YAML file, e.g. {example}", show_default=False)]


RecipeArg = recipe_arg("recipes/quickstart.yaml")



OverridesArg = Annotated[
    Optional[list[str]], typer.Argument(help="key=value overrides of recipe fields, e.g. optim.lr=0.5 seed=1", show_default=False)
]



QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")]



ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue the run in its folder from checkpoints/last.pt")]



ForceOpt = Annotated[bool, typer.Option("--force", help="delete an existing run folder of the same name and start over")]



OutOpt = Annotated[Optional[Path], typer.Option("--out", help="run folder (default: <log.dir>/<name>)")]



def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)



def friendly(fn: Callable) -> Callable:
    """Turn known errors into one clear line and an exit code (the only place that does)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        def show_warning(message, category, filename, lineno, file=None, line=None):
            err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)

        try:
            with warnings.catch_warnings():  # restores the process's showwarning on the way out
                warnings.showwarning = show_warning
                return fn(*args, **kwargs)
        except RunInterrupted as e:
            raise fail(str(e), 130) from None
        except DivergedError as e:
            raise fail(str(e), 3) from None
        except LnsgdError as e:
            raise fail(str(e)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except OSError as e:  # an output file a command was asked to write (--json, --csv, --density, …)
            where = f" {e.filename}" if e.filename else ""
            raise fail(f"cannot write or read{where} ({e.strerror or e}); choose a path in a writable folder") from None

    return wrapper



def progress_for(quiet: bool):
    """A progress bar on a terminal; plain periodic lines where stderr is a log file or a pipe
    (CI, Slurm), which a redrawn bar would fill with lines cut at 80 columns."""
    from lnsgd.track import LineProgress, Progress, RichProgress

    if quiet:
        return Progress()
    return RichProgress(err_console) if err_console.is_terminal else LineProgress(err_console.file)
