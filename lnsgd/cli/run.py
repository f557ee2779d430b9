"""Commands that write run folders: validate, train, init-fullbatch, init-adversarial, demo, theory."""

from __future__ import annotations

import shlex
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from lnsgd.cli.app import (
    ForceOpt,
    OutOpt,
    OverridesArg,
    QuietOpt,
    RecipeArg,
    ResumeOpt,
    app,
    console,
    err_console,
    fail,
    friendly,
    progress_for,
    recipe_arg,
)
from lnsgd.errors import RunInterrupted

FullbatchRecipeArg = recipe_arg("recipes/quickstart-fullbatch.yaml")
AdversarialRecipeArg = recipe_arg("recipes/quickstart-adversarial.yaml")
TheoryRecipeArg = recipe_arg("recipes/theory-quadratic.yaml")


@app.command()
@friendly
def validate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    fields: Annotated[bool, typer.Option("--fields", help="also list every recipe field with its default and meaning")] = False,
) -> None:
    """Check a recipe (with overrides) and print it fully resolved.

    Example: lnsgd validate recipes/quickstart.yaml optim.lr=0.05 --fields
    """
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
    """Run label-noise (or plain) SGD from a recipe into a run folder.

    Example: lnsgd train recipes/quickstart.yaml seed=1
    """
    from lnsgd.recipe import load_recipe
    from lnsgd.runtime import run_dir_for
    from lnsgd.sharpness import training_hook
    from lnsgd.train import train as run_train

    r = load_recipe(recipe, overrides or [])
    with _resumable("train", recipe, overrides, resume, force):
        summary = run_train(r, run_dir_for(r, out), resume=resume, force=force, progress=progress_for(quiet),
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
    from lnsgd.recipe import load_recipe
    from lnsgd.sharpness import training_hook

    r = load_recipe(recipe, overrides or [])
    with _resumable(f"init-{kind}", recipe, overrides, resume, force):
        summary = run_init(kind, r, out, resume=resume, force=force, progress=progress_for(quiet), sharpness_hook=training_hook(r))
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
def init_fullbatch(recipe: FullbatchRecipeArg, overrides: OverridesArg = None, resume: ResumeOpt = False, force: ForceOpt = False,
                   out: OutOpt = None, quiet: QuietOpt = False) -> None:  # fmt: skip
    """Full-batch gradient descent from random init to a zero-error minimizer (at most train.epochs steps).

    Example: lnsgd init-fullbatch recipes/quickstart-fullbatch.yaml
    """
    _init_command("fullbatch", recipe, overrides, resume, force, out, quiet)



@app.command("init-adversarial")
@friendly
def init_adversarial(recipe: AdversarialRecipeArg, overrides: OverridesArg = None, resume: ResumeOpt = False, force: ForceOpt = False,
                     out: OutOpt = None, quiet: QuietOpt = False) -> None:  # fmt: skip
    """Memorize random labels on replicated, partly zeroed data, then fit the true labels: a poorly generalizing minimizer.

    The memorize phase stops at init.adversarial.memorize_acc or after init.adversarial.memorize_epochs
    epochs over the replicated set; train.epochs bounds only the fit phase.

    Example: lnsgd init-adversarial recipes/quickstart-adversarial.yaml
    """
    _init_command("adversarial", recipe, overrides, resume, force, out, quiet)



@app.command()
@friendly
def demo(
    out: Annotated[Path, typer.Option("--out", help="output folder (run folders, demo.png, summary.json)")] = Path("runs/demo"),
    force: ForceOpt = False,
    seed: Annotated[int, typer.Option("--seed", help="the first seed; the arms and baselines run seeds seed … seed+seeds−1")] = 0,
    seeds: Annotated[int, typer.Option("--seeds", help="seeds per arm (and baseline), all from one init")] = 3,
    jobs: Annotated[
        Optional[int], typer.Option("--jobs", help="stages run at once, one process and one CPU thread each (default: the CPUs, ≤ 6)")
    ] = None,
    fullbatch: Annotated[
        bool, typer.Option("--fullbatch/--no-fullbatch", help="also build and escape a full-batch GD init (adds minutes on a CPU)")
    ] = False,
    quick: Annotated[bool, typer.Option("--quick", help="tiny sizes, for a smoke test (numbers mean nothing)")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Quickstart: label-noise SGD escaping poor global minimizers on offline data (mnist1d), in minutes on a CPU.

    Example: lnsgd demo --out runs/demo
    """
    import os

    from lnsgd.demo import demo_table, run_demo

    jobs = min(os.cpu_count() or 1, 6) if jobs is None else jobs
    results = run_demo(out, force=force, seed=seed, seeds=seeds, jobs=jobs, quick=quick, fullbatch=fullbatch,
                       progress_factory=lambda: progress_for(quiet), console=None if quiet else err_console)  # fmt: skip
    console.print(demo_table(results))
    n = len(results["seeds"])
    console.print(f"checks, on the medians over {n} seed{'s' * (n > 1)} (and how many seeds pass each on their own numbers):")
    for name, ok in results["checks"].items():
        mark = "[green]yes[/]" if ok else "[red]no[/]"
        passed, total = results["seed_checks"].get(name, (None, None))
        console.print(f"  {name.replace('_', ' ')}: {mark}" + (f" ({passed}/{total} seeds)" if passed is not None else ""))
    for note in results["notes"]:
        console.print(f"  [yellow]*[/] {note}", highlight=False)
    console.print(f"results: {out}/summary.json, figure: {results['figure']}, runs: {out}/*/", highlight=False, soft_wrap=True)



@app.command()
@friendly
def theory(recipe: TheoryRecipeArg, overrides: OverridesArg = None, force: ForceOpt = False, quiet: QuietOpt = False) -> None:
    """Check Theorem 1 with exact Hessians: label-noise SGD, plain SGD and GD on L + λR from one start.

    Example: lnsgd theory recipes/theory-quadratic.yaml
    """
    from lnsgd.recipe import load_recipe
    from lnsgd.runtime import run_dir_for
    from lnsgd.theory import run_theory, summary_table

    r = load_recipe(recipe, overrides or [])
    summary = run_theory(r, run_dir_for(r), force=force, progress=progress_for(quiet))
    console.print(summary_table(summary))
    console.print(f"done: {summary['run_dir']}  (theory.png, metrics.jsonl, summary.json; {summary['wall_time_s']:.0f}s)",
                  highlight=False, soft_wrap=True)  # fmt: skip



def _print_final(summary: dict) -> None:
    final = summary.get("final") or {}
    parts = [f"{k} {final[k]:.4g}" for k in ("train/loss", "train/acc", "test/acc") if isinstance(final.get(k), float)]
    console.print(f"done: {summary['run_dir']}  ({', '.join(parts)}; {summary['wall_time_s']:.0f}s)", highlight=False, soft_wrap=True)
