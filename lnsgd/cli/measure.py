"""Commands that measure: measure-sharpness (a checkpoint's curvature) and bench (the training step's speed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from lnsgd.cli.app import QuietOpt, app, console, err_console, fail, friendly, progress_for


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
    loss: Annotated[
        str, typer.Option("--loss", help="expected (over the recipe's label noise), clean, or flip:P / gaussian:SIGMA")
    ] = "expected",
    measures: Annotated[
        Optional[list[str]], typer.Option("--measure", help="trace, lambda_max, trace_gn, R (repeatable; default all)")
    ] = None,
    project: Annotated[
        bool, typer.Option("--project", help="also measure at the nearest minimizer of the measured loss on the same examples")
    ] = False,
    project_tol: Annotated[float, typer.Option("--project-tol", help="with --project: stop once ‖∇L‖₂ is at most this")] = 1e-4,
    project_steps: Annotated[int, typer.Option("--project-steps", help="with --project: the step cap")] = 500,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the results as JSON")] = None,
    density: Annotated[Optional[Path], typer.Option("--density", help="also draw the SLQ spectral density to this PNG")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda")] = "auto",
    quiet: QuietOpt = False,
) -> None:
    """tr∇²L, top eigenvalues, tr G and the implicit regularizer R(θ) of a checkpoint.

    Example (after lnsgd train recipes/quickstart.yaml): lnsgd measure-sharpness runs/quickstart/final.pt --hvps 100
    """
    from lnsgd.recipe import parse_measured_loss
    from lnsgd.sharpness import measure_checkpoint

    try:
        parse_measured_loss(loss)
    except ValueError as e:
        raise fail(f"--loss: {e} (got {loss!r})") from None
    if device not in ("auto", "cpu", "cuda"):
        raise fail(f"--device {device!r}: expected auto, cpu or cuda")
    if rtol is not None and not 0 < rtol < 1:
        raise fail(f"--rtol {rtol}: expected a fraction between 0 and 1, e.g. --rtol 0.02 for 2%")
    from lnsgd.sharpness import TRACE_METHODS

    if trace_method not in TRACE_METHODS:
        raise fail(f"--trace-method {trace_method!r}: expected one of {', '.join(TRACE_METHODS)}")
    display = progress_for(quiet)  # a bar on a terminal, plain lines in a log, nothing with --quiet
    shown = {"total": None}

    def progress(done: int, total: int) -> None:
        if total != shown["total"]:  # the plan grew (an adaptive budget, Lanczos restarts)
            if shown["total"] is not None:
                display.stop()
            display.start(total, done, "measuring", unit="HVPs")
            shown["total"] = total
        display.advance(done, {})

    try:
        result = measure_checkpoint(
            checkpoint, eta=eta, momentum=momentum, examples=examples, hvps=hvps, top_k=top_k, seed=seed, which=loss,
            measures=tuple(measures) if measures else ("trace", "lambda_max", "trace_gn", "R"), device=device, density=density,
            progress=progress, trace_method=trace_method, rtol=rtol, project=project, project_tol=project_tol,
            project_steps=project_steps,
        )  # fmt: skip
    finally:
        display.stop()
    from rich.table import Table

    # --hvps is each estimator's budget (hvps_per_estimator); hvps_spent is what all of them (and --density) spent together.
    spent = result["hvps_spent"]
    spent = f"{hvps} HVPs per estimator, {spent} in all" if spent != hvps else f"{hvps} HVPs"
    table = Table(title=f"sharpness of {checkpoint} — {result['loss']} loss, {result['examples']} examples, {spent}")
    table.add_column("quantity")
    table.add_column("at θ" if project else "value", justify="right")
    proj = result.get("projected")
    if proj is not None:
        table.add_column("at the nearest minimizer", justify="right")
    fmt = lambda v, e=None: "—" if v is None else (f"{v:.6g} ± {e:.2g}" if e is not None else f"{v:.6g}")  # noqa: E731

    def row(label: str, key: str, err: str | None = None) -> None:
        cells = [fmt(result[key], result[err] if err else None)]
        if proj is not None:
            cells.append(fmt(proj.get(key), proj.get(err) if err else None))
        table.add_row(label, *cells)

    row(f"tr ∇²L ({result['trace_method']})", "trace_hessian", "trace_hessian_stderr")
    if result["trace_residual"] is not None and proj is None:
        table.add_row("  of which tr(∇²L − G)", fmt(result["trace_residual"], result["trace_hessian_stderr"]))
    row("λ_max", "lambda_max")
    if result["top_eigenvalues"] and len(result["top_eigenvalues"]) > 1:
        table.add_row(f"top {len(result['top_eigenvalues'])} eigenvalues", ", ".join(f"{v:.5g}" for v in result["top_eigenvalues"]),
                      *([", ".join(f"{v:.5g}" for v in proj["top_eigenvalues"] or [])] if proj is not None else []))  # fmt: skip
    row("tr G (Gauss–Newton, exact)", "trace_gn")
    row(f"R(θ) at η={result['eta']:g}, β={result['momentum']:g}", "R", "R_stderr")
    if result["R_bound_eta"]:
        row("R defined for η <", "R_bound_eta")
    if proj is not None:
        p = result["projection"]
        state = "converged" if p["converged"] else "NOT converged"
        table.add_row("projection", "", f"{state}: {p['steps']} steps ({p['method']}), moved ‖Δθ‖ = {p['distance']:.4g}")
        table.add_row("  loss", fmt(p["loss_before"]), fmt(p["loss_after"]))
        table.add_row("  ‖∇L‖₂", fmt(p["grad_norm_before"]), f"{fmt(p['grad_norm_after'])} (tol {p['tol']:g})")
    table.add_row("seconds", f"{result['seconds']:.1f}", *([""] if proj is not None else []))
    console.print(table)
    if result.get("warning"):
        err_console.print(f"[yellow]warning:[/] {result['warning']}", highlight=False, soft_wrap=True)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {json_out}", highlight=False)
    if density is not None:
        console.print(f"wrote {result['density']}", highlight=False)



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

    Example: lnsgd bench --model cnn --steps 10 --json bench.json
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
