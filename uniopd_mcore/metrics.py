"""Per-step metrics: one JSON line per step, TensorBoard scalars, and PNG curves (`uniopd-mcore plot`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

METRICS_FILE = "metrics.jsonl"


def _scalar(value: Any) -> Any:
    """Turn tensors and numpy scalars into plain Python numbers so they serialise to JSON."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        return value.item()
    return value


class MetricsLogger:
    """Appends metrics to ``run_dir/metrics.jsonl`` and, when enabled, to TensorBoard.

    Resuming a run truncates the JSONL to the steps before the resume point, so the file holds each
    step exactly once and equals an uninterrupted run's file step for step.
    """

    def __init__(self, run_dir: str | os.PathLike, *, jsonl: bool = True, tensorboard: bool = True,
                 enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILE
        self._jsonl = jsonl and enabled
        self._tb = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except Exception as exc:  # tensorboard is optional for the loop to work
                print(f"[metrics] TensorBoard disabled: {exc}")

    def truncate_after(self, step: int) -> None:
        """Drop lines with ``step > step`` (left by a run that was killed after its last checkpoint)."""
        if not (self._jsonl and self.path.exists()):
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", -1) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        if self._jsonl:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics file (is '{run_dir}' a run directory?)")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
    return rows


DEFAULT_CURVES = (
    "accuracy", "reward", "return_mean", "groups_violated", "mean_shift", "clip_frac",
    "teacher_gap_clip_frac", "teacher_student_gap", "loss", "grad_norm", "tokens_per_s",
    "step_time", "response_length", "eval_accuracy",
)


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
             keys: Iterable[str] | None = None) -> Path:
    """Draw one small panel per metric against the step and save it as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    wanted = list(keys) if keys else [k for k in DEFAULT_CURVES if any(k in r for r in rows)]
    if not wanted:
        raise ValueError(f"{run_dir}: none of the metrics {list(keys or DEFAULT_CURVES)} were logged")
    cols = min(3, len(wanted))
    nrows = math.ceil(len(wanted) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, wanted):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(wanted):]:
        ax.axis("off")
    fig.tight_layout()
    out_path = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
