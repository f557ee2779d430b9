"""The ``lnsgd`` command line: thin Typer commands over the library.

Each command parses its arguments, loads and validates the recipe, calls one
library function, and turns ``LnsgdError`` into one line on stderr and a non-zero
exit. Exit codes: 1 bad input or failed run, 2 usage, 3 diverged, 130 interrupted.
"""

from __future__ import annotations

import json
import shlex
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
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

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file, e.g. recipes/quickstart.yaml", show_default=False)]
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

    return wrapper


def _progress(quiet: bool):
    from lnsgd.track import Progress, RichProgress

    return Progress() if quiet else RichProgress(err_console)


@app.command()
@friendly
def validate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    fields: Annotated[bool, typer.Option("--fields", help="also list every recipe field with its default and meaning")] = False,
) -> None:
    """Check a recipe (with overrides) and print it fully resolved."""
    from lnsgd.recipe import field_help, load_recipe, recipe_to_yaml

    r = load_recipe(recipe, overrides or [])
    console.print(recipe_to_yaml(r), highlight=False, end="")
    if fields:
        from rich.table import Table

        table = Table("field", "default", "meaning", title="recipe fields")
        for key, default, desc in field_help():
            table.add_row(key, default, desc)
        console.print(table)
    err_console.print(f"[green]ok:[/] {recipe} is a valid recipe", highlight=False)


@app.command()
@friendly
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    out: OutOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run label-noise (or plain) SGD from a recipe into a run folder."""
    from lnsgd.sharpness import training_hook
    from lnsgd.recipe import load_recipe
    from lnsgd.runtime import run_dir_for
    from lnsgd.train import train as run_train

    r = load_recipe(recipe, overrides or [])
    with _resumable("train", recipe, overrides, resume, force):
        summary = run_train(r, run_dir_for(r, out), resume=resume, force=force, progress=_progress(quiet),
                            sharpness_hook=training_hook(r))  # fmt: skip
    _print_final(summary)


@contextmanager
def _resumable(command: str, recipe: Path, overrides, resume: bool, force: bool):
    """Refuse --resume with --force; turn an interrupted run into one line with the command that resumes it."""
    if resume and force:
        raise fail("--resume and --force contradict each other: --resume continues the run, --force deletes it")
    try:
        yield
    except RunInterrupted as e:
        raise fail(f"{e}: {shlex.join(['lnsgd', command, str(recipe), *(overrides or []), '--resume'])}", 130) from None


def _init_command(kind: str, recipe: Path, overrides, resume: bool, force: bool, out, quiet: bool) -> None:
    from lnsgd.inits import run_init
    from lnsgd.sharpness import training_hook
    from lnsgd.recipe import load_recipe

    r = load_recipe(recipe, overrides or [])
    with _resumable(f"init-{kind}", recipe, overrides, resume, force):
        summary = run_init(kind, r, out, resume=resume, force=force, progress=_progress(quiet), sharpness_hook=training_hook(r))
    init = summary["init"]
    acc = lambda v: f"{100 * v:.2f}%" if isinstance(v, float) else "—"  # noqa: E731
    console.print(
        f"init-{kind}: train acc {acc(init['train_acc'])}, test acc {acc(init['test_acc'])}, "
        f"train loss {init['train_loss']:.3g}; {'stop condition reached' if init['reached'] else 'NOT converged'}",
        highlight=False, soft_wrap=True,
    )
    _print_final(summary)
    if not init["reached"]:
        if r.init.allow_unconverged:
            err_console.print(f"[yellow]warning:[/] {init['warning']}", highlight=False, soft_wrap=True)
        else:
            raise fail(init["warning"], 4)


@app.command("init-fullbatch")
@friendly
def init_fullbatch(recipe: RecipeArg, overrides: OverridesArg = None, resume: ResumeOpt = False, force: ForceOpt = False,
                   out: OutOpt = None, quiet: QuietOpt = False) -> None:  # fmt: skip
    """Full-batch gradient descent from random init to a zero-error minimizer (at most train.epochs steps)."""
    _init_command("fullbatch", recipe, overrides, resume, force, out, quiet)


@app.command("init-adversarial")
@friendly
def init_adversarial(recipe: RecipeArg, overrides: OverridesArg = None, resume: ResumeOpt = False, force: ForceOpt = False,
                     out: OutOpt = None, quiet: QuietOpt = False) -> None:  # fmt: skip
    """Memorize random labels on replicated, partly zeroed data, then fit the true labels: a poorly generalizing minimizer."""
    _init_command("adversarial", recipe, overrides, resume, force, out, quiet)


@app.command()
@friendly
def demo(
    out: Annotated[Path, typer.Option("--out", help="output folder (run folders, demo.png, summary.json)")] = Path("runs/demo"),
    force: ForceOpt = False,
    seed: Annotated[int, typer.Option("--seed", help="seed of every stage")] = 0,
    fullbatch: Annotated[
        bool, typer.Option("--fullbatch/--no-fullbatch", help="also build and escape a full-batch GD init (adds minutes on a CPU)")
    ] = False,
    quick: Annotated[bool, typer.Option("--quick", help="tiny sizes, for a smoke test (numbers mean nothing)")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Quickstart: label-noise SGD escaping poor global minimizers on offline data (mnist1d), in minutes on a CPU."""
    from lnsgd.demo import demo_table, run_demo

    results = run_demo(out, force=force, seed=seed, quick=quick, fullbatch=fullbatch,
                       progress_factory=lambda: _progress(quiet), console=err_console)  # fmt: skip
    console.print(demo_table(results))
    for name, ok in results["checks"].items():
        mark = "[green]yes[/]" if ok else "[red]no[/]"
        console.print(f"  {name.replace('_', ' ')}: {mark}")
    console.print(f"results: {out}/summary.json, figure: {results['figure']}, runs: {out}/*/", highlight=False, soft_wrap=True)


@app.command("measure-sharpness")
@friendly
def measure_sharpness(
    checkpoint: Annotated[Path, typer.Argument(help="a final.pt or checkpoints/last.pt", show_default=False)],
    eta: Annotated[Optional[float], typer.Option("--eta", help="η of R(θ) (default: the checkpoint's optim.lr)")] = None,
    momentum: Annotated[Optional[float], typer.Option("--momentum", help="β of R(θ) (default: the checkpoint's optim.momentum)")] = None,
    examples: Annotated[Optional[int], typer.Option("--examples", help="first N training examples (default: 5000 or all)")] = None,
    hvps: Annotated[int, typer.Option("--hvps", help="Hessian-vector products per estimate")] = 100,
    trace_method: Annotated[
        str,
        typer.Option("--trace-method", help="auto (exact tr G + a pilot picks ∇²L − G or ∇²L), split, xtrace, hutchpp or hutchinson"),
    ] = "auto",
    top_k: Annotated[int, typer.Option("--top-k", help="number of top eigenvalues")] = 1,
    rtol: Annotated[
        Optional[float], typer.Option("--rtol", help="stop the trace's HVPs once its standard error is below rtol·|tr∇²L| (--hvps caps it)")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the random probes")] = 0,
    loss: Annotated[str, typer.Option("--loss", help="expected (over the recipe's label noise) or clean")] = "expected",
    measures: Annotated[
        Optional[list[str]], typer.Option("--measure", help="trace, lambda_max, trace_gn, R (repeatable; default all)")
    ] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the results as JSON")] = None,
    density: Annotated[Optional[Path], typer.Option("--density", help="also draw the SLQ spectral density to this PNG")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda")] = "auto",
    quiet: QuietOpt = False,
) -> None:
    """tr∇²L, top eigenvalues, tr G and the implicit regularizer R(θ) of a checkpoint."""
    from lnsgd.sharpness import measure_checkpoint

    if loss not in ("expected", "clean"):
        raise fail(f"--loss {loss!r}: expected 'expected' or 'clean'")
    if device not in ("auto", "cpu", "cuda"):
        raise fail(f"--device {device!r}: expected auto, cpu or cuda")
    if rtol is not None and not 0 < rtol < 1:
        raise fail(f"--rtol {rtol}: expected a fraction between 0 and 1, e.g. --rtol 0.02 for 2%")
    from lnsgd.sharpness import TRACE_METHODS

    if trace_method not in TRACE_METHODS:
        raise fail(f"--trace-method {trace_method!r}: expected one of {', '.join(TRACE_METHODS)}")
    bar = None
    if not quiet:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]measuring"), BarColumn(), MofNCompleteColumn(), TextColumn("HVPs"), TimeElapsedColumn(),
                       console=err_console, transient=True)  # fmt: skip
        task = bar.add_task("hvps", total=None)
        bar.start()
    try:
        result = measure_checkpoint(
            checkpoint, eta=eta, momentum=momentum, examples=examples, hvps=hvps, top_k=top_k, seed=seed, which=loss,
            measures=tuple(measures) if measures else ("trace", "lambda_max", "trace_gn", "R"), device=device, density=density,
            progress=(lambda done, total: bar.update(task, completed=done, total=total)) if bar else None,
            trace_method=trace_method, rtol=rtol,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.stop()
    from rich.table import Table

    table = Table(title=f"sharpness of {checkpoint} — {result['loss']} loss, {result['examples']} examples, {result['hvps']} HVPs")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    fmt = lambda v, e=None: "—" if v is None else (f"{v:.6g} ± {e:.2g}" if e is not None else f"{v:.6g}")  # noqa: E731
    table.add_row(f"tr ∇²L ({result['trace_method']})", fmt(result["trace_hessian"], result["trace_hessian_stderr"]))
    if result["trace_residual"] is not None:
        table.add_row("  of which tr(∇²L − G)", fmt(result["trace_residual"], result["trace_hessian_stderr"]))
    table.add_row("λ_max", fmt(result["lambda_max"]))
    if result["top_eigenvalues"] and len(result["top_eigenvalues"]) > 1:
        table.add_row(f"top {len(result['top_eigenvalues'])} eigenvalues", ", ".join(f"{v:.5g}" for v in result["top_eigenvalues"]))
    table.add_row("tr G (Gauss–Newton, exact)", fmt(result["trace_gn"]))
    table.add_row(f"R(θ) at η={result['eta']:g}, β={result['momentum']:g}", fmt(result["R"], result["R_stderr"]))
    if result["R_bound_eta"]:
        table.add_row("R defined for η <", f"{result['R_bound_eta']:.4g}")
    table.add_row("seconds", f"{result['seconds']:.1f}")
    console.print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {json_out}", highlight=False)
    if density is not None:
        console.print(f"wrote {result['density']}", highlight=False)


@app.command()
@friendly
def theory(recipe: RecipeArg, overrides: OverridesArg = None, force: ForceOpt = False, quiet: QuietOpt = False) -> None:
    """Check Theorem 1 with exact Hessians: label-noise SGD, plain SGD and GD on L + λR from one start."""
    from lnsgd.recipe import load_recipe
    from lnsgd.runtime import run_dir_for
    from lnsgd.theory import run_theory, summary_table

    r = load_recipe(recipe, overrides or [])
    summary = run_theory(r, run_dir_for(r), force=force, progress=_progress(quiet))
    console.print(summary_table(summary))
    console.print(f"done: {summary['run_dir']}  (theory.png, metrics.jsonl, summary.json; {summary['wall_time_s']:.0f}s)",
                  highlight=False, soft_wrap=True)  # fmt: skip


@app.command()
@friendly
def bench(
    model: Annotated[str, typer.Option("--model", help="resnet18, cnn or mlp")] = "resnet18",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="default: 256 (GPU), 32 (CPU)")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="timed steps per pipeline; default: 50 (GPU), 5 (CPU)")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32, tf32 or bf16; default: bf16 (GPU), fp32 (CPU)")] = None,
    compile_mode: Annotated[
        Optional[str], typer.Option("--compile", help="off, default or cuda-graphs; default: cuda-graphs (GPU), off (CPU)")
    ] = None,
    epoch: Annotated[bool, typer.Option("--epoch/--no-epoch", help="also time one full epoch + test evaluation")] = True,
    workers: Annotated[Optional[int], typer.Option("--workers", min=0, help="reference DataLoader workers; 4 (GPU), 0 (CPU)")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the results as JSON")] = None,
) -> None:
    """lnsgd's training step vs the reference pipeline (torchvision + PIL + DataLoader), same process and model.

    On a CPU the defaults are a tiny configuration (width 4, 16×16 images, 256 examples); flags you pass are honoured.
    """
    import dataclasses

    import torch

    from lnsgd.bench import BenchConfig, run_bench, tiny_cpu_config

    if precision not in (None, "fp32", "tf32", "bf16"):
        raise fail(f"--precision {precision!r}: expected fp32, tf32 or bf16")
    if compile_mode not in (None, "off", "default", "cuda-graphs"):
        raise fail(f"--compile {compile_mode!r}: expected off, default or cuda-graphs")
    if model not in ("resnet18", "cnn", "mlp"):
        raise fail(f"--model {model!r}: expected resnet18, cnn or mlp")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = BenchConfig() if device.type == "cuda" else tiny_cpu_config()
    given = {"batch_size": batch_size, "steps": steps, "precision": precision, "compile": compile_mode, "workers": workers}
    cfg = dataclasses.replace(base, model=model, epoch=epoch, **{k: v for k, v in given.items() if v is not None})
    if device.type != "cuda":
        err_console.print(f"[yellow]note:[/] no GPU: a tiny CPU configuration (width {cfg.width}, {cfg.image}×{cfg.image} images, "
                          f"{cfg.train_size} examples, batch {cfg.batch_size}, {cfg.steps} steps); the figures say nothing about a GPU",
                          highlight=False, soft_wrap=True)  # fmt: skip
    r = run_bench(cfg, device)
    from rich.table import Table

    table = Table(title=f"lnsgd bench on {r['device']}: {cfg.model}, batch {cfg.batch_size}, lnsgd {cfg.precision} compile={cfg.compile}")
    for col in ("pipeline", "images/s", "epoch + test (s)", "peak memory (MiB)"):
        table.add_column(col, justify="right" if col != "pipeline" else "left")
    for name in ("reference", "lnsgd"):
        v = r[name]
        table.add_row(name, f"{v['img_per_s']:.0f}", f"{v['epoch_s']:.2f}" if "epoch_s" in v else "—",
                      f"{v['peak_mb']:.0f}" if v["peak_mb"] else "—")  # fmt: skip
    table.add_row("ratio", f"{r['throughput_ratio']:.2f}×", f"{r['epoch_ratio']:.2f}×" if "epoch_ratio" in r else "—", "")
    console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(r, indent=2, default=str))


def _print_final(summary: dict) -> None:
    final = summary.get("final") or {}
    parts = [f"{k} {final[k]:.4g}" for k in ("train/loss", "train/acc", "test/acc") if isinstance(final.get(k), float)]
    console.print(f"done: {summary['run_dir']}  ({', '.join(parts)}; {summary['wall_time_s']:.0f}s)", highlight=False, soft_wrap=True)


RunsArg = Annotated[list[Path], typer.Argument(help="run folders, or folders containing runs (a sweep)", show_default=False)]
IgnoreOpt = Annotated[
    Optional[list[str]], typer.Option("--ignore", help="recipe key to ignore when grouping (repeatable), e.g. init.checkpoint")
]


@app.command()
@friendly
def plot(
    runs: RunsArg,
    out: Annotated[Path, typer.Option("--out", help="folder for plot.png, plot.pdf and plot.csv")] = Path("plots"),
    x: Annotated[str, typer.Option("--x", help="x axis: epoch, step or time_s")] = "epoch",
    metrics: Annotated[
        Optional[list[str]], typer.Option("--metrics", help="panel metric (repeatable); replaces the default panels")
    ] = None,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="run whose final test accuracy is drawn dashed")] = None,
    smooth: Annotated[int, typer.Option("--smooth", min=1, help="running-average window of the correlation panel")] = 1,
    ignore: IgnoreOpt = None,
) -> None:
    """Figures from run folders: accuracy, sharpness and accuracy-vs-sharpness, seeds aggregated."""
    from lnsgd.report import plot_runs

    if x not in ("epoch", "step", "time_s"):
        raise fail(f"--x {x!r}: expected epoch, step or time_s")
    result = plot_runs(runs, out, x=x, metrics=metrics or None, baseline=baseline, smooth=smooth, ignore=ignore or ())
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    for f in result.files:
        console.print(str(f), highlight=False)


@app.command()
@friendly
def compare(
    runs: RunsArg,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="also write the table as CSV")] = None,
    ignore: IgnoreOpt = None,
) -> None:
    """Final metrics per group of runs: median [min, max] over seeds."""
    from lnsgd.report import compare_runs, compare_table, write_csv

    columns, rows = compare_runs(runs, ignore=ignore or ())
    console.print(compare_table(columns, rows))
    if csv is not None:
        console.print(str(write_csv(csv, columns, rows)), highlight=False)


from lnsgd.cli_sweep import register as _register_sweep  # noqa: E402

_register_sweep(app)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
