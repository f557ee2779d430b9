"""What the exact tr G costs, in gradients of the same loss on the same examples.

    .venv/bin/python benchmarks/bench_trace_gn.py                  # full-width ResNet18-GN, 32 examples
    .venv/bin/python benchmarks/bench_trace_gn.py --width 16 --examples 64

Both sides run in one process on random CIFAR-shaped examples and smoothed cross-entropy
(flip p=0.2), the model in eval mode: one full-batch gradient (forward + backward), then
``exact_trace_gauss_newton``, each ``--repeats`` times; prints the medians and their ratio.
tr G needs C = 10 output directions per example, so about C gradients is the floor for a
method that computes it exactly; the ratio is the figure to compare with that. The
default Jacobian budget of ``exact_trace_gauss_newton`` is used unless ``--max-elements``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=64, help="ResNet18 width (64: the paper's, 11.17M parameters)")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-elements", type=int, default=None, help="max_jacobian_elements (default: the library's)")
    args = ap.parse_args()

    from lnsgd.curvature import exact_trace_gauss_newton, smoothed_cross_entropy
    from lnsgd.models import ResNet18

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = ResNet18(3, 10, args.width, "groupnorm", 32 if args.width >= 32 else args.width // 2).to(device).eval()
    dim = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.examples, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.examples,), generator=g).to(device)
    loss_fn = smoothed_cross_entropy(0.2, 10)

    def gradient():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    kwargs = {} if args.max_elements is None else {"max_jacobian_elements": args.max_elements}
    value = []

    def trace_gn():
        value.append(exact_trace_gauss_newton(model, loss_fn, x, y, **kwargs).value)

    gradient()  # warm-up (allocator, kernels)
    t_grad, grads = timed(gradient, args.repeats)
    t_gn, gns = timed(trace_gn, args.repeats)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"ResNet18-GN width {args.width}: {dim:,} parameters, {args.examples} examples, {device.type} ({where}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip
    print(f"gradient     median {t_grad:8.3f} s   runs {', '.join(f'{t:.3f}' for t in grads)}")
    print(f"exact tr G   median {t_gn:8.3f} s   runs {', '.join(f'{t:.3f}' for t in gns)}   tr G = {value[-1]:.6g}")
    print(f"ratio: tr G costs {t_gn / t_grad:.1f} gradients (C = 10 output directions)")


if __name__ == "__main__":
    main()
