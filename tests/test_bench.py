"""lnsgd bench runs both pipelines (tiny CPU configuration); GPU-only settings say so."""

from __future__ import annotations

import json
import time

import pytest
import torch

from .conftest import one_line_error


def test_bench_cpu_tiny(cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the GPU figures are measured by benchmarks/gpu_check.py, not in the suite")
    out = tmp_path / "bench.json"
    started = time.perf_counter()
    res = cli("bench", "--model", "resnet18", "--json", out)
    wall = time.perf_counter() - started
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    # Each side's rate is images over its own timed steps: the timed images cannot take longer
    # than the whole command did, and a rate too high to be true would need less time than that.
    images = r["config"]["steps"] * r["config"]["batch_size"]
    for side in ("reference", "lnsgd"):
        assert 0 < images / r[side]["img_per_s"] < wall, side
    assert images / r["reference"]["img_per_s"] + images / r["lnsgd"]["img_per_s"] < wall  # timed one after the other
    assert f"{r['throughput_ratio']:.2f}×" in res.output and "epoch_ratio" in r


def test_cuda_graphs_on_cpu_says_gpu_only(cli, write_recipe):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: cuda-graphs is valid here")
    assert "needs a CUDA device" in one_line_error(cli("train", write_recipe(), "compile=cuda-graphs", "--quiet"))
