"""`uniopd-mcore verify-conversion`: HF vs Megatron logits through the command line, exit codes
0 (match), 1 (mismatch) and 2 (errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uniopd_mcore.cli", "verify-conversion", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def _json_line(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout + proc.stderr  # exactly one JSON line on stdout
    return json.loads(lines[0])


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_conversion_matches(hf_dir, tp, pp):
    proc = _cli(str(hf_dir), "--tp", str(tp), "--pp", str(pp), "--json", "--seq-len", "24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _json_line(proc)
    assert report["ok"] is True and report["tp"] == tp and report["pp"] == pp
    assert report["tolerance"] == 1e-3
    assert 0.0 <= report["max_abs_logit_diff"] < 1e-4
    assert report["argmax_agreement"] == 1.0
    assert report["seq_lens"] == [24, 16, 8]


def test_simulated_conversion_bug_exits_1(hf_dir):
    # A corrupted file is read the same way by both sides; a wrong mapping is what the tool is
    # for, simulated by perturbing one Megatron weight after loading.
    env = {"UNIOPD_VERIFY_PERTURB": "decoder.layers.1.mlp.linear_fc2.weight=0.01"}
    proc = _cli(str(hf_dir), "--json", "--seq-len", "16", env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = _json_line(proc)
    assert report["ok"] is False and report["max_abs_logit_diff"] > 1e-3
    # a tolerance that covers it passes
    proc = _cli(str(hf_dir), "--seq-len", "16", "--tolerance", "100", env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stdout + proc.stderr[-2000:]


def test_errors_exit_2(hf_dir, tmp_path):
    missing = tmp_path / "missing"
    proc = _cli(str(missing), "--json")
    assert proc.returncode == 2
    report = _json_line(proc)
    assert report["ok"] is False and str(missing) in report["error"] and report["max_abs_logit_diff"] is None
    assert str(missing) in proc.stderr

    no_config = tmp_path / "empty"
    no_config.mkdir()
    proc = _cli(str(no_config))
    assert proc.returncode == 2 and "config.json" in proc.stderr and str(no_config) in proc.stderr

    # truncated weights file: the worker fails, the message names the directory
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(hf_dir).iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    proc = _cli(str(broken), "--json")
    assert proc.returncode == 2, proc.stderr[-3000:]
    report = _json_line(proc)
    assert str(broken) in report["error"]
