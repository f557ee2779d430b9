"""lnsgd bench runs both pipelines (tiny CPU configuration); GPU-only settings say so."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import one_line_error


def test_bench_cpu_tiny(cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the GPU figures are measured by benchmarks/gpu_check.py, not in the suite")
    out = tmp_path / "bench.json"
    res = cli("bench", "--model", "resnet18", "--json", out)
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["reference"]["img_per_s"] > 0 and r["lnsgd"]["img_per_s"] > 0
    assert r["throughput_ratio"] == r["lnsgd"]["img_per_s"] / r["reference"]["img_per_s"]
    assert "epoch_ratio" in r and "ratio" in res.output


def test_cuda_graphs_on_cpu_says_gpu_only(cli, write_recipe):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: cuda-graphs is valid here")
    assert "needs a CUDA device" in one_line_error(cli("train", write_recipe(), "compile=cuda-graphs", "--quiet"))
