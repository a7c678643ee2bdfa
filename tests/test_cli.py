"""The command line: bad configuration and bad data stop the run at start with a clear message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "configs" / "demo_cpu.yaml"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uniopd_mcore.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_unknown_key_and_bad_choice_fail_at_start():
    out = cli("train", "--config", str(DEMO), "recipe.statistic=median")
    assert out.returncode == 2
    assert "recipe.statistic: 'median' is not one of ['mean', 'minmax']" in out.stderr
    out = cli("train", "--config", str(DEMO), "recipe.margni=0.3")
    assert out.returncode == 2 and "unknown key 'recipe.margni'" in out.stderr


def test_bad_data_row_fails_before_training(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=", "answer": "2", "source": "arith"}) + "\n"
                   + json.dumps({"prompt": "2+2=", "source": "arith"}) + "\n")
    out = cli("sft", "--config", str(DEMO), "--out", str(tmp_path / "out"), f"data.train_files=[{bad}]",
              f"model.student={tmp_path / 'missing'}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"{bad} row 2: field 'answer' is missing" in out.stderr
    assert not (tmp_path / "out").exists()


def test_plot_draws_curves(tmp_path):
    rows = [{"step": i, "accuracy": 0.1 * i, "loss": 1.0 / i} for i in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = cli("plot", str(tmp_path))
    assert out.returncode == 0, out.stderr
    png = tmp_path / "curves.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_balance_data_writes_upsampled_file_and_histogram(tmp_path):
    from examples.arithmetic.demo import init_model
    from examples.arithmetic.task import make_problems, write_jsonl
    from examples.arithmetic.tokenizer import build_tokenizer

    build_tokenizer(tmp_path / "tok")
    model = init_model(tmp_path / "student", tmp_path / "tok", seed=0, hidden=32, layers=1, heads=2, kv_heads=1)
    write_jsonl(tmp_path / "train.jsonl", make_problems(12, seed=0))
    out = tmp_path / "balanced.jsonl"
    res = cli("balance-data", "--config", str(DEMO), "--out", str(out), "--k", "4", f"model.student={model}",
              f"data.train_files=[{tmp_path / 'train.jsonl'}]", "rollout.max_response_len=4")
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert info["prompts_in"] == 12 and len(rows) == info["prompts_out"] >= 12  # nothing dropped
    assert sum(info["before"]) == 12 and Path(info["histogram"]).read_bytes()[:4] == b"\x89PNG"
