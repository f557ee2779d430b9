"""The quickstart demo: label-noise SGD escaping poor global minimizers, on offline data.

On mnist1d (generated locally, no download) with the small 1-D CNN of the issue's
prototype, for each of 3 seeds (``--seeds``), in about 1.5 minutes on 2 CPU cores:

1. a standard minibatch-SGD baseline from random initialization;
2. an adversarial initialization (memorize random labels on 2 partly zeroed replicas,
   then fit the true labels) — a global minimizer (100% train accuracy) that
   generalizes worse than the baseline — and, with ``--fullbatch``, a full-batch GD one;
3. from each init, plain SGD (noise none) and label-noise SGD (flip, p = 0.2) for the
   same number of steps, with tr∇²L of one loss — the label-noise arm's expected loss —
   measured along the way;
4. every stage's end point measured twice: at its parameters θ and at the nearest
   minimizer of that loss on the same 500 examples (``sharpness.project_to_minimizer``),
   where Theorem 1 compares flatness;
5. a table of medians [min, max] over the seeds, the checks on the medians with how many
   seeds pass each, a figure with median lines and min–max bands, and ``summary.json``.

Stages are independent processes (``--jobs``, spawned; each on one CPU thread); a seed's
arms start once its init is built. Every stage is an ordinary run folder under the output
folder (``<stage>/seed=<s>``), so ``lnsgd plot`` and ``lnsgd compare`` work on it too and
group the seeds. Why mnist1d and not digits: on digits with an MLP the adversarial
initialization reached 92–97% test accuracy here (no worse than the baseline), on mnist1d
with the CNN 46–60% — the poor minimizer the study needs. Two replicas rather than three
keep the demo short at a milder init (60% rather than 54% test accuracy).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lnsgd.errors import LnsgdError, RunInterrupted
from lnsgd.recipe import Recipe, recipe_from_dict, recipe_to_dict, with_overrides
from lnsgd.runtime import claim_folder
from lnsgd.track import write_atomic

# The whole study, as one base recipe plus per-stage overrides. Units: epochs over the
# 4000 training examples unless noted.
DEMO_BASE = {
    "name": "demo",
    "seed": 0,
    "device": "cpu",
    "data": {"name": "mnist1d"},
    "model": {"name": "cnn", "width": 32},
    "loss": "cross_entropy",
    "noise": {"kind": "none"},
    "optim": {"lr": 0.1, "batch_size": 32},
    "train": {"epochs": 20, "eval_every": 2, "checkpoint_every": 5},
    "init": {
        "stop_loss": 0.01,
        "allow_unconverged": True,
        # Memorize 2 relabelled replicas (10% of positions zeroed) with Adam, then fit with Adam.
        "adversarial": {"replicas": 2, "zero_fraction": 0.1, "memorize_acc": 0.95, "memorize_epochs": 40,
                        "memorize_lr": 0.002, "memorize_batch_size": 64, "optimizer": "adam"},  # fmt: skip
    },
}
BASELINE = ["name=baseline", "train.epochs=20", "optim.lr=0.1", "optim.batch_size=32"]
ADVERSARIAL = ["name=init-adversarial", "optim.lr=0.001", "train.epochs=80", "optim.batch_size=64"]
FULLBATCH = ["name=init-fullbatch", "optim.lr=0.5", "train.epochs=3000", "train.eval_every=25", "train.checkpoint_every=100"]
# lr 0.1: at 0.2 plain SGD is unstable at the sharp adversarial minimum and escapes too.
ARM = ["train.epochs=40", "optim.lr=0.1", "optim.batch_size=32", "train.eval_every=4", "train.checkpoint_every=4"]
LABEL_NOISE = ["noise.kind=flip", "noise.p=0.2"]
# Both arms measure the label-noise arm's expected loss (label-smoothed CE, p = 0.2): one L for the whole study.
SHARPNESS = {"every": 8, "examples": 500, "hvps": 30, "measures": ["trace"], "loss": "flip:0.2"}
# The final point of every stage is also measured at its nearest minimizer of that loss on the same
# 500 examples (sharpness.project_to_minimizer). 1000 steps: plain SGD's end point, a saturated
# clean-loss minimizer, needed ~900 L-BFGS steps to reach the tolerance here; 500 did not.
PROJECT = {"tol": 1e-4, "steps": 1000}
SEEDS = 3


def demo_recipes(seed: int = 0, quick: bool = False) -> dict[str, Recipe]:
    """The recipes of every stage, keyed by stage; ``quick`` shrinks everything for tests."""
    base = recipe_from_dict(DEMO_BASE, source="demo")
    extra = [f"seed={seed}"]
    if quick:  # a smoke-test size: same code path, seconds instead of minutes
        extra += ["data.train_size=200", "data.test_size=100", "model.width=8"]
    stages = {
        "baseline": with_overrides(base, extra + BASELINE),
        "init-adversarial": with_overrides(base, extra + ADVERSARIAL),
        "init-fullbatch": with_overrides(base, extra + FULLBATCH),
    }
    if quick:
        stages = {k: with_overrides(r, ["train.epochs=2", "init.adversarial.memorize_epochs=1", "train.eval_every=1"])
                  for k, r in stages.items()}  # fmt: skip
    return stages


def arm_recipe(stages: dict[str, Recipe], init: str, arm: str, init_checkpoint: Path, quick: bool = False) -> Recipe:
    base = stages["baseline"]
    raw = recipe_to_dict(with_overrides(base, ARM + (LABEL_NOISE if arm == "label_noise" else [])))
    raw["name"] = f"{init}-{arm}"
    raw["init"]["checkpoint"] = str(init_checkpoint)
    raw["track"]["sharpness"] = dict(SHARPNESS)
    if quick:
        raw["train"].update(epochs=2, eval_every=1)
        raw["track"]["sharpness"].update(every=1, examples=50, hvps=6)
    return recipe_from_dict(raw, source="demo")


# ---------------------------------------------------------------------------
# Stages: each one trains (or builds an init) into its run folder and measures its end point.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One unit of the study, picklable for a worker process: plain data only."""

    key: str  # "baseline/0", "init/adversarial/0", "adversarial/label_noise/2"
    kind: str  # "baseline", "init" or "arm"
    recipe: dict
    run_dir: str
    measure_seed: int
    quick: bool = False
    init: str | None = None  # the init kind ("adversarial", "fullbatch") of an init or arm stage

    @property
    def label(self) -> str:
        parts = self.key.split("/")
        if self.kind == "baseline":
            return f"baseline (seed {parts[1]})"
        if self.kind == "init":
            return f"{self.init} init (seed {parts[2]})"
        arm = "plain SGD" if parts[1] == "sgd" else "label-noise SGD"
        return f"{self.init} init → {arm} (seed {parts[2]})"


def measure_recipe(quick: bool = False) -> Recipe:
    """The recipe whose measured loss every tr∇²L of the demo is of: the label-noise arm's."""
    return arm_recipe(demo_recipes(0, quick), "baseline", "label_noise", Path("unused"), quick)


def measure_point(run_dir: Path, seed: int, quick: bool = False) -> dict:
    """Accuracy and tr∇²L of a stage's final.pt, at θ and at the nearest minimizer of the study's loss."""
    from lnsgd.checkpoint import load_checkpoint
    from lnsgd.data import load
    from lnsgd.sharpness import sharpness_of_model

    model, recipe = load_checkpoint(run_dir / "final.pt")
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    measure = measure_recipe(quick)
    cfg = measure.track.sharpness
    steps = 30 if quick else PROJECT["steps"]
    result = sharpness_of_model(model, measure, load(recipe), measures=("trace",), examples=cfg.examples, hvps=cfg.hvps,
                                which=cfg.loss, generator_seed=seed, project=True, project_tol=PROJECT["tol"],
                                project_steps=steps)  # fmt: skip
    report = result["projection"]
    return {
        "train_acc": final["train/acc"], "test_acc": final["test/acc"],
        "trace_hessian": result["sharp/trace_hessian"], "proj_trace_hessian": result["sharp/proj_trace_hessian"],
        "projection": report.as_dict(prefix=""),
    }  # fmt: skip


def run_stage(stage: Stage, progress=None) -> dict:
    """Run one stage and measure its end point (in this process; a worker calls it too)."""
    from lnsgd.inits import run_init
    from lnsgd.sharpness import training_hook
    from lnsgd.track import read_jsonl
    from lnsgd.train import train

    torch.set_num_threads(1)  # tiny models: one thread is faster than two fighting (6.5 vs 89 ms/step under load)
    started = time.perf_counter()
    recipe = recipe_from_dict(stage.recipe, source="demo")
    run_dir = Path(stage.run_dir)
    out: dict = {}
    if stage.kind == "init":
        summary = run_init(stage.init, recipe, run_dir, progress=progress)
        out["reached"] = summary["init"]["reached"]
    else:
        hook = training_hook(recipe) if stage.kind == "arm" else None
        train(recipe, run_dir, progress=progress, sharpness_hook=hook, command="demo")
    out.update(measure_point(run_dir, stage.measure_seed, stage.quick))
    if stage.kind == "arm":
        rows = read_jsonl(run_dir / "metrics.jsonl")
        out["trace_curve"] = [[r["epoch"], r["sharp/trace_hessian"]] for r in rows if r.get("sharp/trace_hessian") is not None]
        out["test_acc_curve"] = [[r["epoch"], r["test/acc"]] for r in rows]
        out["steps"] = rows[-1]["step"]
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def demo_stages(out: Path, seeds: Sequence[int], quick: bool, inits: Sequence[str]) -> tuple[list[Stage], dict[str, list[Stage]]]:
    """The stages that can start at once (inits, baselines), and each init's arms, which start once it is built.

    Every seed is a whole study: its own baseline, its own init, and both arms from that init.
    """
    ready = [Stage(f"init/{kind}/{s}", "init", recipe_to_dict(demo_recipes(s, quick)[f"init-{kind}"]),
                   str(out / f"init-{kind}" / f"seed={s}"), s, quick, kind) for kind in inits for s in seeds]  # fmt: skip
    ready += [Stage(f"baseline/{s}", "baseline", recipe_to_dict(demo_recipes(s, quick)["baseline"]), str(out / "baseline" / f"seed={s}"),
                    s, quick) for s in seeds]  # fmt: skip
    arms: dict[str, list[Stage]] = {}
    for kind in inits:
        for s in seeds:
            ckpt = out / f"init-{kind}" / f"seed={s}" / "final.pt"
            arms[f"init/{kind}/{s}"] = [
                Stage(f"{kind}/{arm}/{s}", "arm", recipe_to_dict(arm_recipe(demo_recipes(s, quick), kind, arm, ckpt, quick)),
                      str(out / f"{kind}-{arm}" / f"seed={s}"), s, quick, kind)
                for arm in ("sgd", "label_noise")
            ]  # fmt: skip
    return ready, arms


def run_demo(out: Path, *, force: bool = False, seed: int = 0, seeds: int = SEEDS, jobs: int = 1, quick: bool = False,
             progress_factory=None, console=None, fullbatch: bool = False) -> dict:  # fmt: skip
    """Run the whole study into ``out`` — ``seeds`` seeds from ``seed`` on, ``jobs`` stages at a time — and
    return (and write) the summary.

    With ``jobs`` > 1 the stages run in spawned processes, which import the caller's main
    module: from a script, call this under ``if __name__ == "__main__":`` (the CLI does).
    """
    from lnsgd.track import Progress

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise LnsgdError(f"--seeds {seeds!r}: the number of seeds must be a positive integer, e.g. --seeds 3")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise LnsgdError(f"--jobs {jobs!r}: the number of stages run at once must be a positive integer, e.g. --jobs 2")
    out = Path(out)
    claim_folder(out, what="demo folder", force=force, other="--out <another folder>", writable="choose a writable --out")
    threads = torch.get_num_threads()
    try:
        return _run_demo(out, list(range(seed, seed + seeds)), jobs, quick, progress_factory or Progress, console, fullbatch)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, seeds: list[int], jobs: int, quick: bool, progress_factory, console, fullbatch: bool) -> dict:
    say = (lambda text: console.print(text, highlight=False)) if console is not None else (lambda text: None)
    started = time.perf_counter()
    inits = ["adversarial"] + (["fullbatch"] if fullbatch else [])
    ready, arms = demo_stages(out, seeds, quick, inits)
    total = len(ready) + sum(len(a) for a in arms.values())
    points: dict[str, dict] = {}
    say(f"lnsgd demo: {total} stages ({len(seeds)} seed{'s' * (len(seeds) > 1)}), {jobs} at a time")
    try:
        if jobs == 1:  # in this process, one stage after the other, each with its own progress bar
            queue = list(ready)
            while queue:
                stage = queue.pop(0)
                say(f"[bold]{len(points) + 1}/{total}[/] {stage.label}")
                points[stage.key] = run_stage(stage, progress_factory())
                queue += arms.get(stage.key, [])
        else:
            _run_parallel(ready, arms, jobs, total, points, say, progress_factory)
    except (KeyboardInterrupt, RunInterrupted) as e:
        # A stage's own message would offer --resume, which the demo does not have.
        how = "Ctrl-C" if isinstance(e, KeyboardInterrupt) or "SIGINT" in str(e) else "a signal"
        raise RunInterrupted(f"demo stopped by {how} after {len(points)} of {total} stages; its finished stages are in {out}; "
                             "start over with --force") from None
    results = summarize(points, seeds, inits)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["jobs"] = jobs
    results["stage_seconds"] = {k: p["seconds"] for k, p in points.items()}
    results["checks"] = demo_checks(results)
    results["seed_checks"] = seed_checks(results)
    results["notes"] = projection_notes(results)
    try:
        results["figure"] = str(demo_figure(results, out / "demo.png"))
        write_atomic(out / "summary.json", json.dumps(results, indent=2))
    except OSError as exc:  # the folder went read-only or away during the study
        raise LnsgdError(f"cannot write the demo's results to --out {out} ({exc.strerror or exc}); its run folders are complete") from None
    return results


def _run_parallel(ready: list[Stage], arms: dict[str, list[Stage]], jobs: int, total: int, points: dict, say, progress_factory):
    """Stages in ``jobs`` worker processes (spawned: no state shared with this one); an init's arms start once it is built."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    bar = progress_factory()
    bar.start(total, 0, "demo stages", unit="stages")
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    running: dict = {}
    try:
        for stage in ready:
            running[pool.submit(run_stage, stage)] = stage
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage = running.pop(future)
                points[stage.key] = future.result()  # a stage's LnsgdError stops the demo with its own message
                p = points[stage.key]
                say(f"  done {stage.label}: test {100 * p['test_acc']:.1f}%, tr∇²L {_num(p['trace_hessian'])} at θ, "
                    f"{_num(p['proj_trace_hessian'])} at the nearest minimizer ({p['seconds']:.0f} s)")  # fmt: skip
                bar.advance(len(points), {})
                for arm in arms.get(stage.key, []):
                    running[pool.submit(run_stage, arm)] = arm
    finally:  # Ctrl-C reaches the workers too (one process group): their runs checkpoint and stop
        bar.stop()
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------
# The summary over seeds: medians with [min, max], checks on the medians and per seed.
# ---------------------------------------------------------------------------

SPREAD_KEYS = ("train_acc", "test_acc", "trace_hessian", "proj_trace_hessian")


def _spread(points: list[dict]) -> dict:
    """Median, min and max of each ``SPREAD_KEYS`` value over ``points`` (the median is the block's own value)."""
    out: dict = {}
    for key in SPREAD_KEYS:
        values = [p[key] for p in points if isinstance(p.get(key), (int, float))]
        out[key] = statistics.median(values) if values else None
        out[f"{key}_range"] = [min(values), max(values)] if values else None
    out["projections_converged"] = sum(bool(p["projection"]["converged"]) for p in points)
    out["seeds"] = len(points)
    return out


def _median_curve(curves: list[list]) -> list[list]:
    """[epoch, median, min, max] at the epochs every curve has."""
    by_epoch = [dict((e, v) for e, v in c) for c in curves]
    common = sorted(set.intersection(*(set(c) for c in by_epoch))) if by_epoch else []
    return [[e, statistics.median(c[e] for c in by_epoch), min(c[e] for c in by_epoch), max(c[e] for c in by_epoch)] for e in common]


def summarize(points: dict[str, dict], seeds: Sequence[int], inits: Sequence[str]) -> dict:
    """The per-stage points as the demo's summary: every block has its median values and ``per_seed``."""
    base = [points[f"baseline/{s}"] for s in seeds]
    results: dict = {"seeds": list(seeds), "baseline": {**_spread(base), "per_seed": {str(s): p for s, p in zip(seeds, base)}},
                     "inits": {}, "runs": {}}  # fmt: skip
    for kind in inits:
        per_seed = [points[f"init/{kind}/{s}"] for s in seeds]
        results["inits"][kind] = {**_spread(per_seed), "per_seed": {str(s): p for s, p in zip(seeds, per_seed)}}
        for arm in ("sgd", "label_noise"):
            per_seed = [points[f"{kind}/{arm}/{s}"] for s in seeds]
            results["runs"][f"{kind}/{arm}"] = {
                **_spread(per_seed), "per_seed": {str(s): p for s, p in zip(seeds, per_seed)},
                "trace_curve": _median_curve([p["trace_curve"] for p in per_seed]),
                "test_acc_curve": _median_curve([p["test_acc_curve"] for p in per_seed]),
                "steps": per_seed[0]["steps"],
            }  # fmt: skip
    return results


def _checks(baseline: dict, init: dict, sgd: dict, ln: dict) -> dict:
    gap = baseline["test_acc"] - init["test_acc"]
    flatter = None not in (ln["proj_trace_hessian"], sgd["proj_trace_hessian"])
    return {
        "adversarial_init_is_a_global_minimizer": init["train_acc"] == 1.0,
        "adversarial_init_15_points_below_baseline": gap >= 0.15,
        "label_noise_5_points_above_sgd": ln["test_acc"] - sgd["test_acc"] >= 0.05,
        "label_noise_recovers_half_the_gap": ln["test_acc"] - init["test_acc"] >= gap / 2,
        # The theory's reading: at the nearest minimizers of one loss, label noise's end point is the flatter one.
        "label_noise_flatter_at_the_nearest_minimizer": flatter and ln["proj_trace_hessian"] < sgd["proj_trace_hessian"],
    }


def demo_checks(results: dict) -> dict:
    """What the paper predicts, evaluated on the medians over seeds (reported, never hidden)."""
    adv = results["inits"].get("adversarial")
    if not adv:
        return {}
    runs = results["runs"]
    return _checks(results["baseline"], adv, runs["adversarial/sgd"], runs["adversarial/label_noise"])


def seed_checks(results: dict) -> dict:
    """How many seeds pass each check on their own numbers: {check: [passed, seeds]}."""
    adv = results["inits"].get("adversarial")
    if not adv:
        return {}
    runs, seeds = results["runs"], [str(s) for s in results["seeds"]]
    each = [_checks(results["baseline"]["per_seed"][s], adv["per_seed"][s], runs["adversarial/sgd"]["per_seed"][s],
                    runs["adversarial/label_noise"]["per_seed"][s]) for s in seeds]  # fmt: skip
    return {name: [sum(bool(c[name]) for c in each), len(each)] for name in each[0]}


def projection_notes(results: dict) -> list[str]:
    """One line per group of end points whose projection did not reach its tolerance."""
    groups = [("baseline", list(results["baseline"]["per_seed"].values()))]
    groups += [(f"{kind} init", list(b["per_seed"].values())) for kind, b in results["inits"].items()]
    groups += [(key.replace("/", " → ").replace("label_noise", "label-noise SGD").replace("sgd", "plain SGD"), list(r["per_seed"].values()))
               for key, r in results["runs"].items()]  # fmt: skip
    notes = []
    for name, points in groups:
        missed = [p["projection"] for p in points if not p["projection"]["converged"]]
        if missed:
            worst = max(m["grad_norm_after"] for m in missed)
            notes.append(f"{name}: {len(missed)} of {len(points)} projections did not reach ‖∇L‖ ≤ {missed[0]['tol']:g} within "
                         f"{missed[0]['max_steps']} steps (‖∇L‖ up to {worst:.2g}); their tr∇²L at the nearest minimizer is at the "
                         "last point reached")  # fmt: skip
    return notes


# ---------------------------------------------------------------------------
# Figure and table.
# ---------------------------------------------------------------------------


def _num(v) -> str:
    return f"{v:.3g}" if isinstance(v, (int, float)) else "—"


def demo_figure(results: dict, path: Path) -> Path:
    """Test accuracy (median, min–max band), tr∇²L along the runs at θ, and tr∇²L at the nearest minimizer at the end."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.4), layout="constrained")
    ax_acc, ax_tr, ax_proj = fig.subplots(1, 3)
    colours = {"adversarial": "tab:red", "fullbatch": "tab:blue"}
    n = len(results["seeds"])
    for key, run in results["runs"].items():
        kind, arm = key.split("/")
        style = "-" if arm == "label_noise" else ":"
        label = f"{kind} init → {'label-noise SGD' if arm == 'label_noise' else 'plain SGD'}"
        for ax, curve, scale in ((ax_acc, run["test_acc_curve"], 100), (ax_tr, run["trace_curve"], 1)):
            if curve:
                xs, med, lo, hi = zip(*curve)
                ax.plot(xs, [scale * y for y in med], style, color=colours[kind], label=label, lw=2)
                # Plain SGD's band hatched, label noise's filled: the two arms share their init's colour.
                band = {"alpha": 0.18} if arm == "label_noise" else {"alpha": 0.35, "hatch": "///", "facecolor": "none"}
                ax.fill_between(xs, [scale * y for y in lo], [scale * y for y in hi], edgecolor=colours[kind], lw=0,
                                **({"color": colours[kind]} if arm == "label_noise" else {}), **band)  # fmt: skip
    b = results["baseline"]
    ax_acc.axhline(100 * b["test_acc"], ls="--", color="black", label="SGD baseline (random init), median")
    if b["test_acc_range"]:
        ax_acc.axhspan(100 * b["test_acc_range"][0], 100 * b["test_acc_range"][1], color="black", alpha=0.08, lw=0)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"Test accuracy (median and range, {n} seeds)")
    ax_tr.set(xlabel="epoch", ylabel="tr ∇²L(θ) (flip p=0.2 expected loss)", title="Sharpness at the iterate", yscale="log")
    # End points at their nearest minimizers: one dot per seed (hollow: not converged), a bar at the median.
    rows = [("baseline", list(b["per_seed"].values()), "black")]
    rows += [(f"{k} init", list(init["per_seed"].values()), colours[k]) for k, init in results["inits"].items()]
    rows += [(f"→ {'LN' if k.endswith('label_noise') else 'SGD'} ({k.split('/')[0][:3]})", list(r["per_seed"].values()),
              colours[k.split("/")[0]]) for k, r in results["runs"].items()]  # fmt: skip
    for i, (_, points, colour) in enumerate(rows):
        for p in points:
            if p.get("proj_trace_hessian") is not None:
                filled = p["projection"]["converged"]
                ax_proj.plot(i, p["proj_trace_hessian"], "o", color=colour, mfc=colour if filled else "none", ms=7)
        values = [p["proj_trace_hessian"] for p in points if p.get("proj_trace_hessian") is not None]
        if values:
            ax_proj.hlines(statistics.median(values), i - 0.3, i + 0.3, color=colour, lw=2)
    ax_proj.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=20, fontsize=8)
    ax_proj.set(ylabel="tr ∇²L at the nearest minimizer", title="Sharpness on Γ at the end (hollow: not converged)")
    for ax in (ax_acc, ax_tr, ax_proj):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8, loc="lower right")  # above the curves sits the baseline
    ax_tr.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def demo_table(results: dict):
    from rich.table import Table

    def spread(block: dict, key: str, pct: bool = False) -> str:
        v, r = block.get(key), block.get(f"{key}_range")
        f = (lambda x: f"{100 * x:.1f}") if pct else _num
        if not isinstance(v, (int, float)):
            return "—"
        text = f(v) + ("%" if pct else "")
        return text + (f" [{f(r[0])}, {f(r[1])}]" if r and r[0] != r[1] else "")

    n = len(results["seeds"])
    from rich.markup import escape

    title = f"lnsgd demo (mnist1d, CNN) — {n} seed{'s' * (n > 1)}, median [min, max] — {results['seconds']:.0f}s"
    table = Table(title=escape(title))
    for col in ("arm", "train acc", "test acc", "tr∇²L at θ (end)", "tr∇²L at the nearest minimizer"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    b = results["baseline"]
    table.add_row("baseline (SGD, random init)", spread(b, "train_acc", True), spread(b, "test_acc", True),
                  spread(b, "trace_hessian"), spread(b, "proj_trace_hessian"))  # fmt: skip
    for kind, init in results["inits"].items():
        star = "" if init["projections_converged"] == init["seeds"] else " *"
        table.add_row(f"{kind} init", spread(init, "train_acc", True), spread(init, "test_acc", True), spread(init, "trace_hessian"),
                      spread(init, "proj_trace_hessian") + star)  # fmt: skip
        for arm in ("sgd", "label_noise"):
            r = results["runs"][f"{kind}/{arm}"]
            name = f"  → {'plain SGD' if arm == 'sgd' else 'label-noise SGD'}"
            star = "" if r["projections_converged"] == r["seeds"] else " *"
            table.add_row(name, spread(r, "train_acc", True), spread(r, "test_acc", True), spread(r, "trace_hessian"),
                          spread(r, "proj_trace_hessian") + star)  # fmt: skip
    return table
