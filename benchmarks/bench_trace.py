"""Benchmark: tr∇²L by lnsgd's XTrace against PyHessian-style Hutchinson.

Not a test. One small model and subset with an exact reference:
a tanh MLP (64 → 32 → 10, 2410 parameters, float64) fit for 200 full-batch Adam
steps to 512 sklearn digits; the exact trace comes from the dense Hessian
(``lnsgd.curvature.dense_hessian``). At equal HVP budgets and over several
seeds it prints the median relative error and the median wall time of

- ``hutchinson``: what PyHessian's ``trace()`` does (Yao et al. 2020) — Rademacher
  probes, one HVP each through the retained gradient graph, plain average
  (written inline here, without PyHessian's early stop);
- ``xtrace``: ``lnsgd.curvature.estimate_trace`` with its default method
  (Epperly, Tropp & Webber 2024) on ``lnsgd.curvature.hessian_matvec``;

then the cost of one HVP relative to one gradient for this model. XTrace wins
most where the top of the spectrum holds much of ‖H‖_F; on flat spectra it is
about Hutchinson's equal.

    .venv/bin/python benchmarks/bench_trace.py [--seeds 10] [--budgets 50 100 200]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from lnsgd import curvature as cv


def digits_subset(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:n], dtype=torch.float64) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    return x, torch.tensor(data.target[:n], dtype=torch.long)


def trained_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int, steps: int) -> nn.Module:
    torch.manual_seed(0)  # the benchmark's own process: the model init only
    model = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        cv.cross_entropy_loss(model(x), y).backward()
        opt.step()
    return model.eval()


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


def seconds_per_call(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--fit-steps", type=int, default=200)
    parser.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest timings on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    x, y = digits_subset(args.examples)
    model = trained_mlp(x, y, args.hidden, args.fit_steps)
    loss_fn = cv.cross_entropy_loss
    start = time.perf_counter()
    H = cv.dense_hessian(model, loss_fn, x, y)
    dense_s = time.perf_counter() - start
    eigenvalues = torch.linalg.eigvalsh(H)
    exact = float(eigenvalues.sum())
    op, dim = cv.hessian_matvec(model, loss_fn, x, y)

    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch thread(s); torch {torch.__version__}")
    print(
        f"model: tanh MLP 64-{args.hidden}-10 (float64, {dim} parameters), {args.examples} digits, "
        f"train loss {float(loss_fn(model(x), y).detach()):.4f}"
    )
    print(
        f"exact tr∇²L = {exact:.6g} (dense Hessian in {dense_s:.1f}s); λ_max = {float(eigenvalues[-1]):.4g}, "
        f"λ_min = {float(eigenvalues[0]):.3g}"
    )
    print(
        f"{args.seeds} seeds; error = |estimate − exact| / exact, median and root-mean-square; "
        "time = median wall seconds per estimate\n"
    )
    header = (
        f"{'HVPs':>5}  {'hutchinson med/rms':>19}  {'xtrace med/rms':>16}  {'rms ratio':>9}  "
        f"{'hutchinson s':>12}  {'xtrace s':>8}"
    )
    print(header)
    print("-" * len(header))
    for budget in args.budgets:
        errors = {"hutchinson": [], "xtrace": []}
        times = {"hutchinson": [], "xtrace": []}
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            value = pyhessian_style_trace(model, loss_fn, x, y, budget, torch.Generator().manual_seed(seed))
            times["hutchinson"].append(time.perf_counter() - t0)
            errors["hutchinson"].append(abs(value - exact) / abs(exact))
            t0 = time.perf_counter()
            estimate = cv.estimate_trace(op, dim, budget, torch.Generator().manual_seed(seed))
            times["xtrace"].append(time.perf_counter() - t0)
            errors["xtrace"].append(abs(estimate.value - exact) / abs(exact))
        med = {k: statistics.median(v) for k, v in errors.items()}
        rms = {k: (sum(e * e for e in v) / len(v)) ** 0.5 for k, v in errors.items()}
        print(
            f"{budget:>5}  {med['hutchinson']:>9.3%}/{rms['hutchinson']:<9.3%}  {med['xtrace']:>7.3%}/{rms['xtrace']:<8.3%}  "
            f"{rms['hutchinson'] / rms['xtrace']:>8.1f}x  "
            f"{statistics.median(times['hutchinson']):>12.3f}  {statistics.median(times['xtrace']):>8.3f}"
        )

    # Cost of one HVP in units of one gradient (forward + backward) of the same loss.
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grad_s = seconds_per_call(lambda: torch.autograd.grad(loss_fn(model(x), y), params), 50)
    cached_s = seconds_per_call(lambda: op(v), 50)
    fresh, _ = cv.hessian_matvec(model, loss_fn, x, y, cache_graph=False)
    fresh_s = seconds_per_call(lambda: fresh(v), 50)
    print(
        f"\ngradient {grad_s * 1e3:.2f} ms; HVP {cached_s * 1e3:.2f} ms with the cached gradient graph "
        f"({cached_s / grad_s:.1f}x a gradient), {fresh_s * 1e3:.2f} ms rebuilding it ({fresh_s / grad_s:.1f}x)"
    )


if __name__ == "__main__":
    main()
