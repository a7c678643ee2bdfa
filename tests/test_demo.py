"""`make demo` end to end at tiny sizes (examples/arithmetic/demo.py with FAST sizes)."""

from __future__ import annotations

import json

from examples.arithmetic.demo import run_demo
from examples.arithmetic.task import read_jsonl


def test_fast_demo_writes_summary_and_curves(tmp_path):
    summary = run_demo(str(tmp_path / "demo"), fast=True)

    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written == summary
    for key in ("student_accuracy_before", "student_accuracy_after", "teacher_accuracy"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["steps"] == 3 and summary["wall_seconds"] > 0
    for key in ("student_accuracy_before_by_operation", "student_accuracy_after_by_operation",
                "teacher_accuracy_by_operation"):
        assert set(summary[key]) == {"add", "sub"}
    assert (tmp_path / "demo" / "opd" / "curves.png").stat().st_size > 0
    assert len((tmp_path / "demo" / "opd" / "metrics.jsonl").read_text().splitlines()) == 3

    # The student learned from the noisy annotator: only subtraction answers differ from the truth.
    clean = {r["prompt"]: int(r["answer"]) for r in read_jsonl(tmp_path / "demo" / "data" / "train.jsonl")}
    noisy = read_jsonl(tmp_path / "demo" / "data" / "student_sft.jsonl")
    wrong = [r for r in noisy if int(r["answer"]) != clean[r["prompt"]]]
    assert wrong and all("-" in r["prompt"] and int(r["answer"]) == clean[r["prompt"]] + 1 for r in wrong)
