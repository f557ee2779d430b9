"""What sharpness tracking costs a run: one training epoch against one measurement, same model and device.

    .venv/bin/python benchmarks/bench_tracking.py --recipe recipes/cifar10-lnsgd.yaml \\
        --train-images 256 --examples 16 --hvps 12        # this CPU: full-width ResNet18, small N

Both sides run on random CIFAR-shaped data in one process: an epoch of ``--train-images``
images through ``lnsgd.train.step.TrainStep`` at the recipe's batch size, precision and compile
mode, and ``measure_sharpness`` at the recipe's ``track.sharpness`` settings, except
``--examples``/``--hvps``. A measurement has a part that grows with the examples (every
product is a pass over them) and a part that does not (Lanczos' re-orthogonalization,
XTrace's sketch, random probes: O(parameters) work per product); so it is timed, after a
warm-up, at ``--examples`` and at twice that, and the line through the two times is
projected to the recipe's ``track.sharpness.examples`` (the number of products is what the
recipe asks for, scaled linearly from ``--hvps``, or what ``rtol`` stopped at). Prints the
measured times and ratio and the projected overhead of tracking over the whole run at the
recipe's sizes (50,000 training images, one measurement every ``track.sharpness.every``
epochs).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/cifar10-lnsgd.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    ap.add_argument("--train-images", type=int, default=256, help="images in the timed epoch")
    ap.add_argument("--full-train-images", type=int, default=50_000)
    ap.add_argument("--examples", type=int, default=16, help="examples of the timed measurement")
    ap.add_argument("--hvps", type=int, default=None, help="HVP budget of the timed measurement (default: the recipe's)")
    args = ap.parse_args()

    from lnsgd.data import Data
    from lnsgd.losses import clean_loss
    from lnsgd.models import DataSpec
    from lnsgd.recipe import load_recipe
    from lnsgd.runtime import backend_settings, resolve_device
    from lnsgd.sharpness import measure_sharpness, measured_loss
    from lnsgd.train.loop import make_model, plain_train_set
    from lnsgd.train.optim import build_optimizer
    from lnsgd.train.step import TrainStep

    recipe = load_recipe(args.recipe, [*args.overrides, "init.checkpoint=null"])
    cfg = recipe.track.sharpness
    if cfg is None:
        raise SystemExit(f"{args.recipe} tracks no sharpness (track.sharpness is null)")
    device = resolve_device(recipe.device)
    with backend_settings(recipe, device):  # the recipe's TF32 setting, as in training
        spec = DataSpec((3, 32, 32), 10)
        g = torch.Generator().manual_seed(0)
        n = max(args.train_images, args.examples)  # examples beyond the timed epoch are only measured
        x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
        y = torch.randint(0, 10, (n,), generator=g).to(device)
        mean, std = torch.full((3, 1, 1), 125.0, device=device), torch.full((3, 1, 1), 63.0, device=device)
        data = Data("bench", x, y, x[:16], y[:16], mean, std, spec)
        model = make_model(recipe, spec, device)
        B = min(recipe.optim.batch_size, args.train_images)
        spe = args.train_images // B
        step = TrainStep(model, plain_train_set(data, recipe.loss), clean_loss(recipe.loss), recipe.noise, 10,
                         build_optimizer("sgd", model, recipe.optim.momentum, 0.0), batch_size=B, steps_per_epoch=spe,
                         precision=recipe.precision, compile_mode=recipe.compile, device=device)  # fmt: skip
        gen = torch.Generator(device=device).manual_seed(0)

        def epoch():
            step.start_epoch(torch.randperm(n, generator=gen, device=device), gen, None, [recipe.optim.lr] * spe)
            for _ in range(spe):
                step.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        epoch()  # warm-up (and compilation)
        t = time.perf_counter()
        epoch()
        epoch_s = time.perf_counter() - t
        hvps = args.hvps or cfg.hvps
        n1, n2 = args.examples, 2 * args.examples
        x, y = torch.cat([x, x[: max(0, n2 - n)]]), torch.cat([y, y[: max(0, n2 - n)]])  # enough examples for n2

        def measure(examples: int) -> tuple[float, dict]:
            inputs, targets = data.normalize(x[:examples]), y[:examples]
            t = time.perf_counter()
            r = measure_sharpness(model, measured_loss(recipe, 10, cfg.loss), inputs, targets, measures=cfg.measures,
                                  hvps=hvps, generator=torch.Generator(device=device).manual_seed(0),
                                  trace_method=cfg.trace_method, rtol=cfg.rtol, eta=recipe.optim.lr,
                                  momentum=recipe.optim.momentum, skip_undefined_R=True)  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t, r

        measure(2)  # warm-up
        t1, r = measure(n1)
        t2, _ = measure(n2)
        per_example = max(t2 - t1, 0.0) / (n2 - n1)
        fixed = max(t1 - per_example * n1, 0.0)

        per_image = epoch_s / (spe * B)
        full_epoch_s = per_image * args.full_train_images
        full_measure_s = (fixed + per_example * cfg.examples) * (cfg.hvps / hvps)
        overhead = full_measure_s / (cfg.every * full_epoch_s)
        print(f"device {device}, model {recipe.model.name} ({sum(p.numel() for p in model.parameters()):,} parameters)")
        print(f"measured: epoch of {spe * B} images {epoch_s:.2f} s; measurement {cfg.measures}, {hvps} HVPs budget "
              f"({r['hvps']} spent): {t1:.2f} s at {n1} examples, {t2:.2f} s at {n2} "
              f"(= {fixed:.2f} s + {per_example:.3f} s per example); ratio measurement/epoch at {n1} examples {t1 / epoch_s:.2f}")
        print(f"projected to the recipe: epoch of {args.full_train_images} images {full_epoch_s:.0f} s; measurement at "
              f"{cfg.examples} examples, {cfg.hvps} HVPs {full_measure_s:.0f} s, every {cfg.every} epochs: "
              f"tracking adds {100 * overhead:.1f}% to the run (target ≤ 10%)")

if __name__ == "__main__":
    main()
