"""lnsgd's eager training step against a bare PyTorch loop, same model, data and process.

    .venv/bin/python benchmarks/bench_step.py [--steps 300] [--repeats 5] [--batch-size 32]

The model is the demo's CNN (``model.name=cnn``, default width) on mnist1d-shaped inputs
(1 × 40, 10 classes). The bare loop is what one writes by hand: index a tensor with the
permutation, flip labels with ``torch.rand``/``torch.randint``, ``loss.backward()``,
``torch.optim.SGD.step()``. lnsgd's side is ``lnsgd.train.step.TrainStep`` with ``compile: off``
(gather, noise from the epoch's pre-drawn row, torch.func gradient, gradient norm,
accumulators, update). Prints the median seconds per step of each over ``--repeats``
alternating rounds, and their ratio (target: lnsgd ≤ 1.10 × bare).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the demo trains single-threaded)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    from lnsgd.data import Data
    from lnsgd.losses import clean_loss
    from lnsgd.models import DataSpec, build_model
    from lnsgd.recipe import ModelConfig, NoiseConfig
    from lnsgd.train.loop import plain_train_set
    from lnsgd.train.optim import SGD
    from lnsgd.train.step import TrainStep

    n, B, p = 4000, args.batch_size, 0.2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 40, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    spec = DataSpec((1, 40), 10)
    data = Data("bench", x, y, x[:100], y[:100], torch.zeros(()), torch.ones(()), spec)

    def model():
        torch.manual_seed(0)
        return build_model(ModelConfig(name="cnn"), spec)

    bare_model = model()
    opt = torch.optim.SGD(bare_model.parameters(), lr=0.05, momentum=0.9)
    noise_gen = torch.Generator().manual_seed(1)

    def bare(steps: int) -> None:
        perm = torch.randperm(n, generator=noise_gen)
        for b in range(steps):
            idx = perm[(b % (n // B)) * B : (b % (n // B) + 1) * B]
            xb, yb = data.normalize(x[idx]), y[idx]
            flip = torch.rand(yb.shape, generator=noise_gen) < p
            yb = torch.where(flip, (yb + torch.randint(1, 10, yb.shape, generator=noise_gen)) % 10, yb)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(bare_model(xb), yb)
            loss.backward()
            opt.step()

    own_model = model()
    spe = n // B
    step = TrainStep(own_model, plain_train_set(data, "cross_entropy"), clean_loss("cross_entropy"), NoiseConfig(kind="flip", p=p), 10,
                     SGD(dict(own_model.named_parameters()), momentum=0.9), batch_size=B, steps_per_epoch=spe,
                     device=torch.device("cpu"))  # fmt: skip

    def lnsgd(steps: int) -> None:
        for b in range(steps):
            if b % spe == 0:
                step.start_epoch(torch.randperm(n, generator=noise_gen), noise_gen, None, [0.05] * spe)
            step.step()

    bare(20)
    lnsgd(20)
    times = {"bare": [], "lnsgd": []}
    for _ in range(args.repeats):
        for name, fn in (("bare", bare), ("lnsgd", lnsgd)):
            t = time.perf_counter()
            fn(args.steps)
            times[name].append((time.perf_counter() - t) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:6s} {1e3 * med[k]:.3f} ms/step  (range {1e3 * min(v):.3f}–{1e3 * max(v):.3f}, {args.repeats} rounds)")
    print(f"ratio lnsgd/bare: {med['lnsgd'] / med['bare']:.3f}  (target ≤ 1.10)")


if __name__ == "__main__":
    main()
