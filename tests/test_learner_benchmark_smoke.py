"""benchmarks/learner.py in smoke mode (tiny Qwen3, CPU): it runs both sides on the same packed
batches and the same weights, and writes its JSON and Markdown table. Run in its own process: the
benchmark initialises torch.distributed for the learner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "learner.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is the real benchmark, not a smoke test")
def test_learner_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| provider | tokens_per_s |" in proc.stdout
    path = tmp_path / "cpu-smoke-learner.json"
    result = json.loads(path.read_text())
    for key in ("device", "smoke", "date", "versions", "dtype", "config", "rows", "summary"):
        assert key in result, key
    assert result["smoke"] is True and result["device"] == "cpu"
    assert result["versions"]["megatron-core"] and result["versions"]["transformers"]
    rows = {r["provider"]: r for r in result["rows"]}
    assert {"megatron_fwd_bwd", "megatron_train_step", "hf_sdpa_padded"} <= set(rows)
    for r in rows.values():
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0
        assert r["mfu"] is None  # no peak rate for a CPU
    config = result["config"]
    assert config["tokens_per_iter"] == config["tokens"] * config["micro_batches"]
    # same weights and tokens on both sides: the same loss (float32 on CPU)
    assert result["summary"]["first_loss_rel_diff"] < 1e-5


def test_flops_formula():
    """6 * N * tokens + causal attention, with N counted from the Qwen3 shape."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_learner", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    m = bench.QWEN3_1_7B
    n = bench.matmul_params(m)
    # 28 * (2048*2048 + 2*2048*1024 + 2048*2048 + 3*2048*6144) + 2048*151936
    assert n == 28 * (4_194_304 + 4_194_304 + 4_194_304 + 37_748_736) + 311_164_928
    seqs = [[[0] * 3, [0] * 5]]
    attn = 6 * 28 * 16 * 128 * (9 + 25)
    assert bench.train_flops(m, seqs) == pytest.approx(6 * n * 8 + attn)
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert bench.peak_tflops("cpu", None) is None
    batches = bench.make_micro_batches(bench.FULL, 151_936)
    for mb in batches:
        assert sum(len(s) for s in mb) == 8192
        assert all(len(s) <= 4096 for s in mb) and all(len(s) >= 256 for s in mb[:-1])
