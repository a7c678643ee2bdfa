"""The embedded CPU example, end to end (`make demo`, or `uniopd-mcore demo --run-dir runs/demo`).

  1. a character-level tokenizer and a synthetic arithmetic task (train and held-out prompts);
  2. `sft`: a teacher and a weaker student, both Qwen3-architecture models trained by the
     Megatron-Core learner on CPU with an NLL loss, from the same initial weights for the same
     number of steps; the student's data come from a noisy annotator (most subtraction answers
     off by one), so it gets most subtractions wrong;
  3. Uni-OPD on the student with the teacher scoring every sampled token (the same loop that runs
     on H100 clusters, with in-process engines instead of SGLang servers);
  4. runs/demo/summary.json (held-out greedy accuracies before/after, overall and per operation,
     teacher accuracy, steps, wall time) and PNG curves.

Everything fits in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .task import is_subtraction, make_problems, noisy_annotator, tiny_qwen3_config, write_jsonl
from .tokenizer import build_tokenizer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"


@dataclass
class DemoSizes:
    train_problems: int = 4000
    eval_problems: int = 200
    teacher: dict = None  # tiny_qwen3_config kwargs
    student: dict = None
    teacher_sft_steps: int = 2500
    student_sft_steps: int = 2500  # same architecture, initial weights and steps; noisy data instead
    student_noise_rate: float = 0.7  # fraction of subtraction answers off by one in each copy
    student_noise_copies: int = 4  # independent corruptions: the student learns "usually off by one"
    sft_batch: int = 64
    sft_lr: float = 2e-3
    opd_steps: int = 120
    opd_prompts_per_step: int = 16
    opd_samples: int = 8
    opd_lr: float = 1e-5

    def __post_init__(self):
        self.teacher = self.teacher or dict(hidden=128, layers=2, heads=4, kv_heads=2)
        self.student = self.student or dict(self.teacher)


FAST = DemoSizes(train_problems=300, eval_problems=24, teacher=dict(hidden=32, layers=1, heads=2, kv_heads=1),
                 student=dict(hidden=32, layers=1, heads=2, kv_heads=1), teacher_sft_steps=4,
                 student_sft_steps=2, sft_batch=8, opd_steps=3, opd_prompts_per_step=2, opd_samples=4)


def init_model(out_dir: Path, tokenizer_dir: Path, seed: int, **arch) -> Path:
    """A randomly initialised HF checkpoint directory (weights + config + tokenizer files)."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_qwen3_config(**arch))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def by_operation(records) -> dict[str, list]:
    """Held-out records split by operation (the student's noisy slice is subtraction)."""
    return {"add": [r for r in records if "+" in r.prompt], "sub": [r for r in records if "-" in r.prompt]}


def accuracy(model_dir: Path, records, config) -> float:
    from transformers import AutoTokenizer

    from uniopd_mcore.rewards import get_verifier
    from uniopd_mcore.rollout.embedded import EmbeddedRolloutEngine
    from uniopd_mcore.trainer import evaluate_accuracy

    tok = AutoTokenizer.from_pretrained(model_dir)
    verifiers = {src: get_verifier(s.verifier) for src, s in config.data.sources.items()}
    engine = EmbeddedRolloutEngine(str(model_dir), dtype="float32")
    return evaluate_accuracy(engine, tok, records, verifiers, config.rollout.max_response_len,
                             (tok.eos_token_id,))


def run_demo(run_dir: str = "runs/demo", fast: bool = False, seed: int = 0, sizes: DemoSizes | None = None) -> dict:
    from uniopd_mcore.config import load_config
    from uniopd_mcore.data.prompts import load_prompts
    from uniopd_mcore.metrics import plot_run
    from uniopd_mcore.run import build_learner, run_sft
    from uniopd_mcore.trainer import Trainer

    t_start = time.perf_counter()
    sizes = sizes or (FAST if fast else DemoSizes())
    run = Path(run_dir)
    data = run / "data"
    data.mkdir(parents=True, exist_ok=True)

    # 1. tokenizer and task ------------------------------------------------------------------
    tok_dir = run / "tokenizer"
    build_tokenizer(tok_dir)
    train = make_problems(sizes.train_problems, seed=seed)
    held_out = make_problems(sizes.eval_problems, seed=seed + 1, exclude=[p.prompt for p in train])
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "eval.jsonl", held_out)
    student_data = noisy_annotator(train, is_subtraction, rate=sizes.student_noise_rate,
                                   copies=sizes.student_noise_copies, seed=seed)
    write_jsonl(data / "student_sft.jsonl", student_data)

    def config(*overrides: str):
        return load_config(str(CONFIG), [f"logging.run_dir={run}", f"data.train_files=[{data / 'train.jsonl'}]",
                                         f"data.eval_files=[{data / 'eval.jsonl'}]", *overrides])

    base = config()
    eval_records = load_prompts(base.data.eval_files, base.data.sources)

    # 2. teacher and student by SFT with the Megatron-Core learner ------------------------------
    def sft(name: str, arch: dict, steps: int, model_seed: int, train_file: Path) -> Path:
        init = init_model(run / f"{name}_init", tok_dir, model_seed, **arch)
        cfg = config(f"model.student={init}", f"data.train_files=[{train_file}]", f"trainer.steps={steps}",
                     f"trainer.prompts_per_step={sizes.sft_batch}", f"optimizer.lr={sizes.sft_lr}",
                     "optimizer.warmup_steps=50", "optimizer.lr_schedule=cosine", "optimizer.weight_decay=0.0",
                     "optimizer.clip_grad=1.0", "logging.progress=false")
        print(f"[demo] SFT {name}: {steps} steps of {sizes.sft_batch} problems")
        return run_sft(cfg, str(run / name))

    # Both start from the same random weights (same seed) and train as long; only the data differ.
    teacher_dir = sft("teacher", sizes.teacher, sizes.teacher_sft_steps, seed + 10, data / "train.jsonl")
    student_dir = sft("student", sizes.student, sizes.student_sft_steps, seed + 10, data / "student_sft.jsonl")
    slices = by_operation(eval_records)

    def accuracies(model_dir: Path) -> tuple[float, dict]:
        return (accuracy(model_dir, eval_records, base),
                {op: accuracy(model_dir, recs, base) for op, recs in slices.items()})

    teacher_acc, teacher_ops = accuracies(teacher_dir)
    before, before_ops = accuracies(student_dir)
    print(f"[demo] held-out accuracy: teacher {teacher_acc:.3f} {teacher_ops}, "
          f"student before Uni-OPD {before:.3f} {before_ops}")

    # 3. Uni-OPD -----------------------------------------------------------------------------
    opd_dir = run / "opd"
    cfg = config(f"model.student={student_dir}", f"teachers.0.model_path={teacher_dir}",
                 f"logging.run_dir={opd_dir}", f"checkpoint.dir={opd_dir / 'checkpoints'}",
                 f"trainer.steps={sizes.opd_steps}", f"trainer.prompts_per_step={sizes.opd_prompts_per_step}",
                 f"rollout.n_samples_per_prompt={sizes.opd_samples}", f"optimizer.lr={sizes.opd_lr}",
                 "optimizer.warmup_steps=5",
                 f"trainer.eval_every={max(1, sizes.opd_steps // 5)}", "trainer.eval_prompts=0",
                 f"checkpoint.save_every={sizes.opd_steps}")
    trainer = Trainer(cfg, build_learner(cfg))
    history = trainer.train()
    after = history[-1]["eval_accuracy"]
    after_ops = {op: trainer.evaluate(recs) for op, recs in slices.items()}  # the synced rollout engine
    curves = plot_run(opd_dir)

    # 4. summary -----------------------------------------------------------------------------
    summary = {
        "student_accuracy_before": before,
        "student_accuracy_after": after,
        "teacher_accuracy": teacher_acc,
        "student_accuracy_before_by_operation": before_ops,
        "student_accuracy_after_by_operation": after_ops,
        "teacher_accuracy_by_operation": teacher_ops,
        "steps": len(history),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "eval_problems": len(eval_records),
        "fast": fast,
        "curves": str(curves),
        "metrics": str(opd_dir / "metrics.jsonl"),
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
