"""Everything about lnsgd that only a GPU can show, in one run (≤ 8 minutes on one H100/H200).

    python benchmarks/gpu_check.py --out gpu-check          # on the GPU machine
    python benchmarks/gpu_check.py --tiny --out /tmp/check  # CPU, seconds: the suite runs this so it cannot rot

Writes ``<out>/gpu_check.json`` and prints one table. The checks:

1. ``lnsgd bench`` ratios against the reference pipeline (torchvision + PIL + DataLoader):
   fp32 eager, fp32 cuda-graphs, bf16 cuda-graphs — images/s and one epoch + test evaluation.
2. Agreement: 200 steps of compiled bf16 against eager fp32 from the same init and noise
   (relative difference of the mean noisy loss over the last 50 steps).
3. Exact resume on the device: a run stopped half-way and resumed against an uninterrupted
   one, eager and compiled (largest weight difference; 0 means bit-identical).
4. ``measure-sharpness`` of ResNet18-GN at 5000 CIFAR-shaped examples: seconds, peak
   memory, and exact tr G's seconds in gradient-equivalents (one gradient over the same examples).
5. Two runs of a sweep sharing the GPU (``lnsgd sweep --jobs 2``): both finish.

On a CPU (``--tiny``) every check runs at toy size, with ``compile: default`` where a GPU
would use CUDA graphs; its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lnsgd.bench import BenchConfig, run_bench, tiny_cpu_config
from lnsgd.errors import RunInterrupted
from lnsgd.recipe import recipe_from_dict
from lnsgd.track import Progress
from lnsgd.train import train


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_bench(device, tiny: bool) -> list[dict]:
    graphs = "cuda-graphs" if device.type == "cuda" else "default"
    base = tiny_cpu_config() if tiny else BenchConfig()
    rows = []
    for precision, mode in (("fp32", "off"), ("fp32", graphs), ("bf16", graphs)):
        # Compiling a ResNet on 2 CPU cores takes minutes: the tiny run compiles an MLP instead.
        cfg = dataclasses.replace(base, precision=precision, compile=mode, model="mlp" if tiny and mode != "off" else base.model)
        r = run_bench(cfg, device)
        rows.append({"precision": precision, "compile": mode, "model": cfg.model, "lnsgd_img_per_s": r["lnsgd"]["img_per_s"],
                     "reference_img_per_s": r["reference"]["img_per_s"], "throughput_ratio": r["throughput_ratio"],
                     "epoch_s": r["lnsgd"].get("epoch_s"), "reference_epoch_s": r["reference"].get("epoch_s"),
                     "epoch_ratio": r.get("epoch_ratio"), "peak_mb": r["lnsgd"]["peak_mb"]})  # fmt: skip
    return rows


def _recipe(device, tiny: bool, **extra) -> dict:
    model = {"name": "mlp", "width": 32} if tiny else {"name": "cnn", "width": 64, "norm": "groupnorm"}
    raw = {"name": "check", "seed": 0, "device": device.type, "data": {"name": "digits"}, "model": model,
           "noise": {"kind": "flip", "p": 0.2}, "optim": {"lr": 0.05, "momentum": 0.9, "batch_size": 32},
           "train": {"epochs": 4, "eval_every": 2, "checkpoint_every": 2}}  # fmt: skip
    for k, v in extra.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw


def check_agreement(device, tiny: bool, root: Path) -> dict:
    """200 steps (digits: 40 steps an epoch × 5) of compiled bf16 against eager fp32."""
    graphs = "cuda-graphs" if device.type == "cuda" else "default"
    extra = {"train": {"epochs": 5, "eval_every": 5, "checkpoint_every": 5}, "optim": {"lr": 0.02, "momentum": 0.0, "batch_size": 32}}
    fp32 = train(recipe_from_dict(_recipe(device, tiny, **extra)), root / "agree-fp32")
    bf16 = train(recipe_from_dict(_recipe(device, tiny, precision="bf16", compile=graphs, **extra)), root / "agree-bf16")
    a, b = fp32["final"]["train/noisy_loss"], bf16["final"]["train/noisy_loss"]
    return {"steps": fp32["steps"], "fp32_eager_loss": a, "bf16_compiled_loss": b, "relative_difference": abs(a - b) / abs(a),
            "fp32_test_acc": fp32["final"]["test/acc"], "bf16_test_acc": bf16["final"]["test/acc"]}  # fmt: skip


class _StopAt(Progress):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def advance(self, epoch, info):
        if epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGINT)


def check_resume(device, tiny: bool, root: Path) -> list[dict]:
    graphs = "cuda-graphs" if device.type == "cuda" else "default"
    rows = []
    for mode in ("off", graphs):
        recipe = recipe_from_dict(_recipe(device, tiny, compile=mode))
        train(recipe, root / f"resume-{mode}-a")
        try:
            train(recipe, root / f"resume-{mode}-b", progress=_StopAt(2))
        except RunInterrupted:
            pass
        train(recipe, root / f"resume-{mode}-b", resume=True)
        wa = torch.load(root / f"resume-{mode}-a/final.pt", weights_only=True)["model"]
        wb = torch.load(root / f"resume-{mode}-b/final.pt", weights_only=True)["model"]
        diff = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
        rows.append({"compile": mode, "max_weight_difference": diff, "bit_identical": diff == 0.0})
    return rows


def check_sharpness(device, tiny: bool) -> dict:
    from lnsgd.losses import smoothed_cross_entropy
    from lnsgd.models import DataSpec, build_model
    from lnsgd.recipe import ModelConfig
    from lnsgd.sharpness import measure_sharpness

    n, width, image, hvps = (64, 4, 8, 12) if tiny else (5000, None, 32, 60)
    torch.manual_seed(0)
    config = ModelConfig(name="resnet18", width=width, group_size=2 if tiny else None)
    model = build_model(config, DataSpec((3, image, image), 10)).to(device)
    x = torch.randn(n, 3, image, image, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    loss = smoothed_cross_entropy(0.2, 10)
    chunk = 1024
    # One gradient over the same examples, in the same chunks: the unit of tr G's cost.
    _sync(device)
    t = time.perf_counter()
    model.zero_grad()
    for s in range(0, n, chunk):
        (loss(model(x[s : s + chunk]), y[s : s + chunk]) * (min(chunk, n - s) / n)).backward()
    _sync(device)
    gradient_s = time.perf_counter() - t
    model.zero_grad()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator(device=device).manual_seed(0)
    t = time.perf_counter()
    gn = measure_sharpness(model, loss, x, y, measures=("trace_gn",), hvps=hvps, generator=gen, chunk_size=chunk)
    _sync(device)
    trace_gn_s = time.perf_counter() - t
    t = time.perf_counter()
    full = measure_sharpness(model, loss, x, y, measures=("trace", "lambda_max"), hvps=hvps, generator=gen, chunk_size=chunk)
    _sync(device)
    return {"examples": n, "hvps": full["hvps"], "seconds": time.perf_counter() - t, "gradient_s": gradient_s,
            "trace_gn_s": trace_gn_s, "trace_gn_gradient_equivalents": trace_gn_s / gradient_s,
            "trace_hessian": full["sharp/trace_hessian"], "lambda_max": full["sharp/lambda_max"], "trace_gn": gn["sharp/trace_gn"],
            "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}  # fmt: skip


def check_sweep(device, tiny: bool, root: Path) -> dict:
    recipe = root / "sweep-base.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(_recipe(device, tiny, log={"dir": str(root / "runs")}, train={"epochs": 2})))
    t = time.perf_counter()
    command = [sys.executable, "-m", "lnsgd", "sweep", str(recipe), "--grid", "seed=0,1", "--jobs", "2", "--name", "shared"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    done = [p for p in (root / "runs" / "shared").glob("*/summary.json")]
    return {"exit_code": proc.returncode, "runs_finished": len(done), "seconds": time.perf_counter() - t,
            "stderr_tail": proc.stderr.strip().splitlines()[-1:] if proc.returncode else []}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-check"))
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the default without a GPU)")
    ap.add_argument("--only", nargs="*", default=None, help="bench agreement resume sharpness sweep (default: all)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "tiny": tiny, "checks": {}}  # fmt: skip
    checks = {"bench": lambda r: check_bench(device, tiny), "agreement": lambda r: check_agreement(device, tiny, r),
              "resume": lambda r: check_resume(device, tiny, r), "sharpness": lambda r: check_sharpness(device, tiny),
              "sweep": lambda r: check_sweep(device, tiny, r)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in checks.items():
            if args.only and name not in args.only:
                continue
            t = time.perf_counter()
            try:
                result["checks"][name] = {"result": fn(Path(tmp)), "seconds": time.perf_counter() - t}
            except Exception as e:  # noqa: BLE001 - one failed check must not hide the others' figures
                result["checks"][name] = {"error": f"{type(e).__name__}: {e}"[:500], "seconds": time.perf_counter() - t}
            (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
            print(f"{name}: {json.dumps(result['checks'][name], default=str)[:600]}", flush=True)
    print(f"wrote {args.out / 'gpu_check.json'}")
    return 1 if any("error" in c for c in result["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
