"""The CPU benchmarks at toy size, so that they cannot rot; their figures are only printed, never asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_curvature import dense_gauss_newton_trace_from_jacobians

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300,
                          cwd=BENCH.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_bench_trace_gn_prints_the_dense_trace_and_a_ratio():
    out = run("bench_trace_gn.py", "--width", "2", "--examples", "3", "--repeats", "1", "--device", "cpu")
    printed = float(re.search(r"tr G = (\S+)", out).group(1))
    assert re.search(r"ratio: tr G costs \d+\.\d gradients", out)
    # The same model and examples as the script builds, against dense per-example Jacobians.
    from lnsgd.models import ResNet18

    torch.manual_seed(0)
    model = ResNet18(3, 10, 2, "groupnorm", 1).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=g)
    assert printed == pytest.approx(dense_gauss_newton_trace_from_jacobians(model, x, "cross_entropy"), rel=1e-4)


def test_bench_tracking_projects_from_two_sizes():
    out = run("bench_tracking.py", "model.width=4", "model.group_size=2", "optim.batch_size=8",
              "--train-images", "16", "--examples", "2", "--hvps", "4")  # fmt: skip
    assert "at 2 examples" in out and "at 4 (=" in out
    assert re.search(r"tracking adds \d+\.\d% to the run", out)
