"""benchmarks/kernels.py in smoke mode (tiny shapes, interpreter on CPU): it runs and writes its files."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def test_kernel_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--out-dir", str(tmp_path)])
    stem = "cpu-smoke" if not torch.cuda.is_available() else None
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1 and (stem is None or files[0].stem == stem)
    result = json.loads(files[0].read_text())
    for key in ("device", "torch", "triton", "cuda", "date", "smoke", "copy_bandwidth_GBps", "rows", "goals"):
        assert key in result, key
    assert result["smoke"] is True
    benches = {(r["bench"], r["provider"]) for r in result["rows"] if "error" not in r}
    assert {("token_logprobs", "triton"), ("token_logprobs", "torch_eager"), ("advantages", "triton"),
            ("linear", "fused_triton"), ("linear", "unfused_triton")} <= benches  # fmt: skip
    assert all(r["fwdbwd_ms"] > 0 for r in result["rows"] if r["bench"] == "token_logprobs")
    assert files[0].with_suffix(".png").exists()
    assert "| bench | provider |" in capsys.readouterr().out
