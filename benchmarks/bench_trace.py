"""Benchmark: lnsgd's tr∇²L against PyHessian-style Hutchinson at equal budgets.

Not a test. For each model it prints, at equal budgets of Hessian-vector products
(HVPs), the root-mean-square and median relative error over seeds, and the wall
time of one estimate, of

- ``hutchinson``: what PyHessian's ``trace()`` does (Yao et al. 2020): Rademacher
  probes, one HVP each, plain average (timed through the retained gradient graph,
  as PyHessian does, without its early stop);
- ``xtrace``: ``lnsgd.curvature.estimate_trace`` (XTrace) on the Hessian;
- ``split``: ``lnsgd.curvature.trace_hessian(method="split")``: tr G exactly from
  per-example Jacobians, plus XTrace on the residual ∇²L − G only;
- ``auto``: what ``lnsgd measure-sharpness`` uses by default
  (``trace_hessian(method="auto")``): exact tr G, then a pilot of m/25 probes on
  both ∇²L and ∇²L − G picks the less noisy one for XTrace.
  The exact tr G of both is charged to their budget: they get
  m − ⌈t(tr G)/t(HVP)⌉ products, both times measured here.

Models, each fit with Adam on clean labels to a global minimizer (train loss 0.01),
measured on the flip-noise expected loss (label-smoothed CE, p = 0.2) as
``measure-sharpness`` does by default, in float64:

- ``cnn``: a small ReLU CNN (conv 8-8-8, FC 32, 3370 parameters) on mnist1d;
- ``cnn-gn``: the same with GroupNorm, where ∇²L − G has a nonzero trace;
- ``mlp-tanh``: a tanh MLP (64-32-10, 2410 parameters) on sklearn digits.

Held-out models, added after the estimator's defaults were fixed and never used to
choose them (issue 19):

- ``digits-gn-cnn2d``: a 2-D GroupNorm ReLU CNN on the 8×8 digits images (conv 8-8, FC 16);
- ``digits-relu-cnn2d``: the same without GroupNorm (every layer linear: ``auto:exact``);
- ``mlp-gelu``: a GELU MLP of another width (64-40-10) on digits.

Every model is a clean-loss minimizer measured on the flip-noise smoothed loss, the
regime where ∇²L − G is largest.

The closing table charges every product: Hutchinson spends the whole budget on HVPs;
auto is charged ⌈t(exact tr G)/t(HVP)⌉ HVPs for tr G (timed in this process) plus its
pilot and XTrace's products, or tr G alone where it is exact. It prints auto's and
Hutchinson's relative RMS error, their ratio, and one HVP's cost with the gradient
graph cached and rebuilt. ``--cache-examples N`` also times HVPs of a quickstart-sized
MLP (40-256-256-10) on N mnist1d examples at the CLI's chunk_size 1024, with the
chunked graph cache (default) and without.

The reference is the trace of the dense Hessian (one HVP per column; the HVP
equals the dense Hessian to 1e-10, see tests/test_curvature.py), and the error
statistics are computed on the dense matrices H and H − G (G from dense
per-example Jacobians) so that many seeds are cheap; times are of real estimates.

``--checkpoint PATH`` adds an lnsgd checkpoint at full size (e.g. the demo's
adversarial init, runs/quickstart-adversarial/final.pt, 91k parameters), where no
dense Hessian fits: its reference is exact tr G plus the residual's trace from
``--reference-probes`` Hutchinson probes (its standard error is printed). Its loss
is the recipe's expected loss, or flip noise p's with ``--checkpoint-flip p``.

    .venv/bin/python benchmarks/bench_trace.py [--models cnn cnn-gn mlp-tanh digits-gn-cnn2d digits-relu-cnn2d mlp-gelu]
        [--budgets 50 100 200] [--seeds 20] [--cache-examples 4000] [--checkpoint runs/quickstart-adversarial/final.pt]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
from torch import nn

from lnsgd import curvature as cv


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def standardized(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


def mnist1d(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from lnsgd.data import _load_mnist1d

    x, y, _, _ = _load_mnist1d()
    return standardized(x[:n].double()), y[:n]


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:n], dtype=torch.float64) / 16.0
    return (x - x.mean(0)) / (x.std(0) + 1e-3), torch.tensor(data.target[:n], dtype=torch.long)


def small_cnn(groupnorm: bool) -> nn.Module:
    norm = (lambda c: nn.GroupNorm(2, c)) if groupnorm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv1d(1, 8, 5, 1, 2), norm(8), nn.ReLU(),
        nn.Conv1d(8, 8, 3, 2, 1), norm(8), nn.ReLU(),
        nn.Conv1d(8, 8, 3, 2, 1), norm(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(80, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


def digits_cnn2d(groupnorm: bool) -> nn.Module:
    norm = (lambda c: nn.GroupNorm(2, c)) if groupnorm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, 1, 1), norm(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, 2, 1), norm(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_steps: int = 3000) -> tuple[nn.Module, int, float]:
    """Adam on the clean labels until the train loss is 0.01 (a global minimizer)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = 0
    while steps < max_steps:
        opt.zero_grad()
        loss = cv.cross_entropy_loss(model(x), y)
        loss.backward()
        opt.step()
        steps += 1
        if loss.item() < 0.01:
            break
    return model.eval(), steps, loss.item()


def build(name: str, examples: int):
    torch.manual_seed(0)  # the benchmark's own process: model inits only
    if name == "mlp-tanh":
        x, y = digits(examples)
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
        desc = "tanh MLP 64-32-10 on sklearn digits"
    elif name == "mlp-gelu":
        x, y = digits(examples)
        model = nn.Sequential(nn.Linear(64, 40), nn.GELU(), nn.Linear(40, 10)).double()
        desc = "GELU MLP 64-40-10 on sklearn digits (held out)"
    elif name.startswith("digits-"):
        x, y = digits(examples)
        x = x.view(-1, 1, 8, 8)
        model = digits_cnn2d(name == "digits-gn-cnn2d").double()
        desc = f"2-D ReLU CNN{' with GroupNorm' if 'gn' in name else ''} on 8×8 sklearn digits (held out)"
    else:
        x, y = mnist1d(examples)
        model = small_cnn(name == "cnn-gn").double()
        desc = f"ReLU CNN{' with GroupNorm' if name == 'cnn-gn' else ''} on mnist1d"
    model, steps, loss = fit(model, x, y)
    acc = float((model(x).argmax(1) == y).double().mean())
    return model, x, y, f"{desc}: Adam {steps} steps, clean train loss {loss:.4f}, train acc {acc:.1%}"


def dense_gauss_newton(model: nn.Module, loss_fn, x: torch.Tensor) -> torch.Tensor:
    """G = (1/n)·Σᵢ JᵢᵀΛᵢJᵢ from per-example Jacobians (dense; the reference)."""
    names, params = zip(*[(k, p.detach()) for k, p in model.named_parameters()], strict=True)

    def output(ps, xi):
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (xi.unsqueeze(0),)).reshape(-1)

    G = 0
    for start in range(0, len(x), 128):
        xc = x[start : start + 128]
        jac = torch.func.vmap(torch.func.jacrev(output), in_dims=(None, 0))(params, xc)
        J = torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac], 2)  # (b, k, dim)
        out = model(xc).detach()  # Λᵢ written out here, not lnsgd's: this is the reference
        p = out.softmax(1)
        lam = torch.eye(out.shape[1], dtype=out.dtype).expand(len(out), -1, -1) if loss_fn.kind == "mse" else (
            torch.diag_embed(p) - p[:, :, None] * p[:, None, :])  # fmt: skip
        G = G + torch.einsum("bkd,bkl,ble->de", J, lam, J)
    return G / len(x)


def pyhessian_style_trace(model, loss_fn, x, y, num_probes: int, generator: torch.Generator) -> float:
    """Hutchinson as PyHessian does it: grads with create_graph once, then one
    backward per Rademacher probe (retain_graph), and the mean of vᵀHv."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    values = []
    for _ in range(num_probes):
        vs = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1 for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        values.append(sum(float((h * v).sum()) for h, v in zip(hv, vs, strict=True)))
    return sum(values) / len(values)


def seconds(fn, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def hvp_seconds(model, loss_fn, x, y, cache_graph: bool | None, chunk_size: int = 1024, repeats: int = 10) -> float:
    """One HVP's wall time, cached (after the first product built the graphs) or rebuilt each time."""
    op, dim = cv.hessian_matvec(model, loss_fn, x, y, chunk_size, cache_graph=cache_graph)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=next(model.parameters()).dtype)
    op(v)  # builds the cached gradient graph (and decides whether to keep it)
    return min(seconds(lambda: op(v), repeats) for _ in range(2))


def gn_cost_in_hvps(model, loss_fn, x, y) -> tuple[int, float, float, float]:
    hvp_s = hvp_seconds(model, loss_fn, x, y, cache_graph=None)  # the default: cached here (one chunk)
    uncached_s = hvp_seconds(model, loss_fn, x, y, cache_graph=False)
    gn_s = min(seconds(lambda: cv.exact_trace_gauss_newton(model, loss_fn, x, y)) for _ in range(3))
    return math.ceil(gn_s / hvp_s), gn_s, hvp_s, uncached_s


SUMMARY: list[tuple] = []  # (model, budget, hutchinson rms, auto rms, auto's method, charge, hvp ms cached, uncached)


def auto_estimate(model, H, HmG, dim, trace_gn: float, rest: int, g) -> tuple[float, str]:
    """What trace_hessian(method="auto") returns, on the dense matrices: exact tr G where the
    model is provably piecewise linear, else the pilot's choice and XTrace on ``rest`` products."""
    if cv.is_piecewise_linear(model):
        return trace_gn, "auto:exact"
    est = cv.choose_trace(H, HmG, dim, trace_gn, rest, g)
    return est.value, est.method


def rms_of(errors: list[float]) -> float:
    return math.sqrt(sum(e * e for e in errors) / len(errors))


def summary() -> None:
    """The closing table: every product charged, auto (default) against Hutchinson."""
    print("## auto (default) vs Hutchinson, all products charged (tr G in HVP-equivalents timed above)\n")
    print("| model | HVPs | Hutchinson | auto (default) | auto's choice | Hutchinson / auto | tr G charged (HVPs) "
          "| HVP ms cached | HVP ms uncached |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, budget, hutch, auto, methods, charge, cached, uncached in SUMMARY:
        # An exact estimate's error is rounding (~1e-15): its ratio to Hutchinson's says nothing more.
        auto_text, ratio = (f"{auto:.3%}", f"{hutch / auto:.1f}×") if auto > 1e-9 else (f"{auto:.0e}", "exact")
        print(f"| {name} | {budget} | {hutch:.3%} | {auto_text} | {methods} | {ratio} | {charge} | {cached * 1e3:.2f} | "
              f"{uncached * 1e3:.2f} |")
    print()


def bench_cache(examples: int, threads: int) -> None:
    """HVP time at the CLI's defaults (chunk_size 1024) with the chunked graph cache and without."""
    from lnsgd.data import _load_mnist1d

    x, y, _, _ = _load_mnist1d()
    n = min(examples, len(x))
    x, y = standardized(x[:n].flatten(1)), y[:n]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    loss_fn = cv.smoothed_cross_entropy(0.2, 10)
    op, dim = cv.hessian_matvec(model, loss_fn, x, y)
    op(torch.zeros(dim))
    cached = hvp_seconds(model, loss_fn, x, y, cache_graph=None, repeats=5)
    uncached = hvp_seconds(model, loss_fn, x, y, cache_graph=False, repeats=5)
    print(f"== graph cache at the CLI's defaults: MLP 40-256-256-10 ({dim:,} parameters, float32) on {n} mnist1d examples, "
          f"chunk_size 1024 ({math.ceil(n / 1024)} chunks), {threads} thread(s)")
    print(f"default (cache_graph=None): cache {'kept' if op.cache_graph else 'off'}, estimated graph "
          f"{op.graph_bytes / 2**20:.1f} MiB ≤ bound; HVP {cached * 1e3:.2f} ms cached, {uncached * 1e3:.2f} ms rebuilt "
          f"(cache_graph=False): {uncached / cached:.2f}× faster\n")


def report(rows: dict[int, dict[str, list[float]]], times: dict[int, dict[str, float]], charge: int) -> None:
    header = (
        f"{'HVPs':>5}  {'hutchinson rms/med':>19}  {'xtrace rms/med':>16}  {'split rms/med':>16}  {'auto rms/med':>16}  "
        f"{'auto vs hutch':>13}  {'hutch s':>7}  {'auto s':>7}"
    )
    print(header)
    print("-" * len(header))
    for budget, errors in rows.items():
        rms = {k: math.sqrt(sum(e * e for e in v) / len(v)) for k, v in errors.items()}
        med = {k: statistics.median(abs(e) for e in v) for k, v in errors.items()}
        ratio = rms["hutchinson"] / rms["auto"] if rms["auto"] > 1e-9 else math.inf  # ∞: auto:exact, rounding error only
        print(
            f"{budget:>5}  {rms['hutchinson']:>9.3%}/{med['hutchinson']:<9.3%}  {rms['xtrace']:>7.3%}/{med['xtrace']:<8.3%}  "
            f"{rms['split']:>7.3%}/{med['split']:<8.3%}  {rms['auto']:>7.3%}/{med['auto']:<8.3%}  {ratio:>12.1f}x  "
            f"{times[budget]['hutchinson']:>7.2f}  {times[budget]['auto']:>7.2f}"
        )
    print(f"(split and auto: exact tr G charged as {charge} HVPs; the rest of each budget on probes)\n")


def bench_dense(name: str, examples: int, budgets: list[int], seeds: int) -> None:
    model, x, y, desc = build(name, examples)
    loss_fn = cv.smoothed_cross_entropy(0.2, 10)
    op, dim = cv.hessian_matvec(model, loss_fn, x, y)
    start = time.perf_counter()
    H = torch.stack([op(e) for e in torch.eye(dim, dtype=torch.float64)], 1)
    H = 0.5 * (H + H.T)
    dense_s = time.perf_counter() - start
    G = dense_gauss_newton(model, loss_fn, x)
    exact = float(torch.trace(H))
    gn = cv.exact_trace_gauss_newton(model, loss_fn, x, y)
    charge, gn_s, hvp_s, uncached_s = gn_cost_in_hvps(model, loss_fn, x, y)
    exact_model = cv.is_piecewise_linear(model)
    print(f"== {name}: {desc}; {dim} parameters, {examples} examples; piecewise linear (auto:exact): {exact_model}")
    print(
        f"exact tr∇²L = {exact:.6g} (dense, {dense_s:.0f}s); tr G = {float(torch.trace(G)):.6g} dense, "
        f"{gn.value:.6g} exact_trace_gauss_newton; tr(∇²L − G) = {exact - float(torch.trace(G)):.3g}"
    )
    off = lambda M: float((M**2).sum() - (torch.diagonal(M) ** 2).sum())  # noqa: E731
    print(
        f"Hutchinson's per-probe variance ∝ off-diagonal ‖·‖²: {off(H):.4g} for ∇²L, {off(H - G):.4g} for ∇²L − G; "
        f"HVP {hvp_s * 1e3:.1f} ms cached, {uncached_s * 1e3:.1f} ms rebuilt; exact tr G {gn_s * 1e3:.0f} ms"
    )
    rows, times = {}, {}
    residual, _ = cv.residual_matvec(model, loss_fn, x, y)
    for budget in budgets:
        rest = max(budget - charge, 4)
        errors = {"hutchinson": [], "xtrace": [], "split": [], "auto": []}
        methods = set()
        for seed in range(seeds):
            g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
            errors["hutchinson"].append((cv.estimate_trace(H, dim, budget, g(), method="hutchinson").value - exact) / exact)
            errors["xtrace"].append((cv.estimate_trace(H, dim, budget, g()).value - exact) / exact)
            resid = cv.estimate_trace(H - G, dim, rest, g()).value  # XTrace, as trace_hessian does
            errors["split"].append((gn.value + resid - exact) / exact)
            value, method = auto_estimate(model, H, H - G, dim, gn.value, rest, g())
            errors["auto"].append((value - exact) / exact)
            methods.add(method.removeprefix("auto:"))
        rows[budget] = errors
        SUMMARY.append((name, budget, rms_of(errors["hutchinson"]), rms_of(errors["auto"]), "/".join(sorted(methods)), charge,
                        hvp_s, uncached_s))  # fmt: skip
        times[budget] = {
            "hutchinson": seconds(lambda: pyhessian_style_trace(model, loss_fn, x, y, budget, torch.Generator().manual_seed(0))),
            "auto": seconds(lambda: cv.trace_hessian(model, loss_fn, x, y, rest, torch.Generator().manual_seed(0))),
        }
    del residual
    print(f"{seeds} seeds; error = (estimate − exact)/exact, root-mean-square and median |·|; time = one estimate, wall seconds")
    report(rows, times, charge)


def bench_checkpoint(path: str, examples: int, budgets: list[int], seeds: int, reference_probes: int, flip: float | None) -> None:
    import lnsgd
    from lnsgd.data import load
    from lnsgd.sharpness import evaluation_subset, measured_loss

    model, recipe = lnsgd.load_checkpoint(path)
    model.eval()
    data = load(recipe, torch.device("cpu"))
    x, y = evaluation_subset(data, recipe, min(examples, len(data.train_x)))
    loss_fn = measured_loss(recipe, data.num_classes, "expected") if flip is None else cv.smoothed_cross_entropy(flip, data.num_classes)
    op, dim = cv.hessian_matvec(model, loss_fn, x, y)
    residual, _ = cv.residual_matvec(model, loss_fn, x, y)
    gn = cv.exact_trace_gauss_newton(model, loss_fn, x, y)
    charge, gn_s, hvp_s, _ = gn_cost_in_hvps(model, loss_fn, x, y)
    ref = cv.estimate_trace(residual, dim, reference_probes, torch.Generator().manual_seed(10_000), method="hutchinson")
    exact = gn.value + ref.value
    print(f"== checkpoint {path}: {recipe.model.name} on {recipe.data.name}, {dim} parameters, {len(x)} examples, {loss_fn!r}, float32")
    print(
        f"reference tr∇²L = {exact:.6g} = exact tr G {gn.value:.6g} + residual {ref.value:.3g} ± {ref.stderr:.2g} "
        f"({reference_probes} probes; ±{ref.stderr / abs(exact):.3%} of the trace); HVP {hvp_s * 1e3:.0f} ms, exact tr G {gn_s:.2f} s"
    )
    rows, times = {}, {}
    for budget in budgets:
        rest = max(budget - charge, 4)
        errors = {"hutchinson": [], "xtrace": [], "split": [], "auto": []}
        hutch_s, auto_s = [], []
        for seed in range(seeds):
            g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
            t0 = time.perf_counter()
            errors["hutchinson"].append((pyhessian_style_trace(model, loss_fn, x, y, budget, g()) - exact) / exact)
            hutch_s.append(time.perf_counter() - t0)
            errors["xtrace"].append((cv.estimate_trace(op, dim, budget, g()).value - exact) / exact)
            errors["split"].append((cv.trace_hessian(model, loss_fn, x, y, rest, g(), method="split").value - exact) / exact)
            t0 = time.perf_counter()
            errors["auto"].append((cv.trace_hessian(model, loss_fn, x, y, rest, g()).value - exact) / exact)
            auto_s.append(time.perf_counter() - t0)
        rows[budget] = errors
        times[budget] = {"hutchinson": statistics.median(hutch_s), "auto": statistics.median(auto_s)}
    print(f"{seeds} seeds through real HVPs; error = (estimate − reference)/reference")
    report(rows, times, charge)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = ["cnn", "cnn-gn", "mlp-tanh", "digits-gn-cnn2d", "digits-relu-cnn2d", "mlp-gelu"]
    parser.add_argument("--models", nargs="*", default=names, choices=names)
    parser.add_argument("--cache-examples", type=int, default=4000, help="time the chunked graph cache on N examples (0: skip)")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--checkpoint", default=None, help="also an lnsgd checkpoint at full size")
    parser.add_argument("--checkpoint-examples", type=int, default=1000)
    parser.add_argument("--checkpoint-seeds", type=int, default=6)
    parser.add_argument("--reference-probes", type=int, default=1000)
    parser.add_argument("--checkpoint-flip", type=float, default=None, help="measure the checkpoint on flip noise p's expected loss")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch thread(s); torch {torch.__version__}\n")
    if args.cache_examples:
        bench_cache(args.cache_examples, torch.get_num_threads())
    for name in args.models:
        bench_dense(name, args.examples, args.budgets, args.seeds)
    if args.models:
        summary()
    if args.checkpoint:
        bench_checkpoint(
            args.checkpoint, args.checkpoint_examples, args.budgets, args.checkpoint_seeds, args.reference_probes, args.checkpoint_flip
        )


if __name__ == "__main__":
    main()
