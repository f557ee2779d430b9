"""benchmarks/gpu_check.py, the one GPU validation run, at toy size on the CPU so that it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_runs_every_check_at_toy_size(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)  # fmt: skip
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = result["checks"]
    assert set(checks) == {"bench", "agreement", "resume", "sharpness", "sweep"}
    errors = {k: v["error"] for k, v in checks.items() if "error" in v}
    assert not errors and proc.returncode == 0, (errors, proc.stderr[-2000:])
    assert [row["compile"] for row in checks["bench"]["result"]] == ["off", "default", "default"]
    assert all(row["throughput_ratio"] > 0 for row in checks["bench"]["result"])
    assert checks["agreement"]["result"]["steps"] == 200
    assert checks["agreement"]["result"]["relative_difference"] < 0.05  # bf16 compiled vs fp32 eager
    assert all(row["bit_identical"] for row in checks["resume"]["result"])
    assert checks["sharpness"]["result"]["trace_gn"] > 0 and checks["sharpness"]["result"]["lambda_max"] > 0
    assert checks["sweep"]["result"]["runs_finished"] == 2
