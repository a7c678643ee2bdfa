"""Does the recipe matter? Student before / plain OPD / OPD + margin calibration / full Uni-OPD.

    python benchmarks/recipe_ablation.py                  # ~7 min on 2 CPU cores
    python benchmarks/recipe_ablation.py --slice ends_in_7 --teacher-offset 10 --out ...

The synthetic arithmetic task of the CPU example. The student is the demo's: same architecture,
initial weights and steps as the teacher, trained on a noisy annotator's answers (most
subtractions off by one), so it is unsure of subtractions. The teacher is *confidently wrong on a
known slice*: trained on answers off by --teacher-offset (default +1, the student's own likely
mistake) on --slice (examples/arithmetic/task.py::SLICES; default odd_sub, the subtractions with
an odd first operand: half of what the student is unsure of). There plain OPD confirms the
student's mistake; the verifier knows the true answers, so outcome-guided margin calibration can
overrule the teacher exactly where it lies. Variants (same teacher, same starting
student, OPD seeds varied):

  opd          token-level OPD only            recipe.calibration=none,  no balancing
  opd_margin   + outcome-guided margin shift   recipe.calibration=shift, no balancing
  uniopd       + online and offline balancing  shift, online 1:1, training prompts upsampled
                                               by the student's pass rate (DESIGN 1.6, 1.7)

Writes benchmarks/results/recipe_ablation.json and .md (mean and spread over seeds) with the
held-out greedy accuracy overall, on the corrupted slice and on the rest.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from examples.arithmetic.demo import CONFIG, DemoSizes, init_model  # noqa: E402
from examples.arithmetic.task import (  # noqa: E402
    corrupt_answers,
    SLICES,
    make_problems,
    noisy_annotator,
    write_jsonl,
)
from examples.arithmetic.tokenizer import build_tokenizer  # noqa: E402

VARIANTS = {
    "opd": ["recipe.calibration=none", "recipe.online_balance=false"],
    "opd_margin": ["recipe.calibration=shift", "recipe.online_balance=false"],
    "uniopd": ["recipe.calibration=shift", "recipe.online_balance=true"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/ablation")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recipe_ablation"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teacher-steps", type=int, default=2500)
    demo = DemoSizes()
    ap.add_argument("--student-steps", type=int, default=demo.student_sft_steps)
    ap.add_argument("--opd-steps", type=int, default=demo.opd_steps)
    ap.add_argument("--opd-lr", type=float, default=demo.opd_lr)
    ap.add_argument("--teacher-offset", type=int, default=1,
                    help="the teacher's error on the slice: +1 is the student's own likely mistake on "
                         "subtractions, so plain OPD confirms it; +10 is a digit the student is sure of")
    ap.add_argument("--slice", choices=sorted(SLICES), default="odd_sub",
                    help="where the teacher is wrong: ends_in_7 (first operand ends in 7, ~15%% of problems) "
                         "or odd_sub (subtractions with an odd first operand: half of what the student is unsure of)")
    ap.add_argument("--train-problems", type=int, default=4000)
    ap.add_argument("--eval-problems", type=int, default=400)
    args = ap.parse_args()

    from uniopd_mcore.config import load_config
    from uniopd_mcore.data.prompts import load_prompts
    from uniopd_mcore.rewards import get_verifier
    from uniopd_mcore.rollout.embedded import EmbeddedRolloutEngine
    from uniopd_mcore.run import balance_file, build_learner, estimate_pass_rates, run_sft
    from uniopd_mcore.trainer import Trainer, evaluate_accuracy

    t0 = time.perf_counter()
    run = Path(args.run_dir)
    data = run / "data"
    data.mkdir(parents=True, exist_ok=True)
    tok_dir = run / "tokenizer"
    build_tokenizer(tok_dir)
    on_slice = SLICES[args.slice]
    train = make_problems(args.train_problems, seed=0)
    held = make_problems(args.eval_problems, seed=1, exclude=[p.prompt for p in train])
    write_jsonl(data / "train.jsonl", train)
    # the teacher is confidently wrong on the slice
    write_jsonl(data / "teacher_train.jsonl", corrupt_answers(train, on_slice, offsets=(args.teacher_offset,)))
    write_jsonl(data / "student_train.jsonl", noisy_annotator(train, rate=demo.student_noise_rate,
                                                              copies=demo.student_noise_copies))
    write_jsonl(data / "eval.jsonl", held)
    write_jsonl(data / "eval_slice.jsonl", [p for p in held if on_slice(p)])
    write_jsonl(data / "eval_rest.jsonl", [p for p in held if not on_slice(p)])

    def config(*overrides: str):
        return load_config(str(CONFIG), [f"logging.run_dir={run}", f"data.train_files=[{data / 'train.jsonl'}]",
                                         f"data.eval_files=[{data / 'eval.jsonl'}]", "logging.progress=false",
                                         "logging.tensorboard=false", *overrides])

    base = config()
    evals = {name: load_prompts([str(data / f"{f}.jsonl")], base.data.sources)
             for name, f in [("all", "eval"), ("slice", "eval_slice"), ("rest", "eval_rest")]}
    verifiers = {src: get_verifier(s.verifier) for src, s in base.data.sources.items()}

    def sft(name: str, arch: dict, steps: int, train_file: Path, seed: int) -> Path:
        init = init_model(run / f"{name}_init", tok_dir, seed, **arch)
        cfg = config(f"model.student={init}", f"data.train_files=[{train_file}]", f"trainer.steps={steps}",
                     "trainer.prompts_per_step=64", "optimizer.lr=2e-3", "optimizer.warmup_steps=50",
                     "optimizer.lr_schedule=cosine", "optimizer.weight_decay=0.0")
        print(f"[ablation] SFT {name}: {steps} steps", flush=True)
        return run_sft(cfg, str(run / name))

    # As in the demo: same architecture, initial weights and steps; the student's data are noisy.
    arch = demo.teacher
    teacher = sft("teacher", arch, args.teacher_steps, data / "teacher_train.jsonl", 10)
    student = sft("student", arch, args.student_steps, data / "student_train.jsonl", 10)

    def accuracies(engine, tokenizer) -> dict:
        return {k: evaluate_accuracy(engine, tokenizer, recs, verifiers, base.rollout.max_response_len,
                                     (tokenizer.eos_token_id,)) for k, recs in evals.items()}

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    results = {
        "teacher": accuracies(EmbeddedRolloutEngine(str(teacher), dtype="float32"), tok),
        "student_before": accuracies(EmbeddedRolloutEngine(str(student), dtype="float32"), tok),
    }
    print(f"[ablation] teacher {results['teacher']}  student {results['student_before']}", flush=True)

    # Offline difficulty-aware balancing for the full recipe: pass rates of the starting student.
    engine = EmbeddedRolloutEngine(str(student), dtype="float32")
    records = load_prompts(base.data.train_files, base.data.sources)
    rates = estimate_pass_rates(engine, tok, records, verifiers, k=8, max_new_tokens=base.rollout.max_response_len)
    balanced = data / "train_balanced.jsonl"
    results["offline_balance"] = balance_file(records, rates, balanced, max_repeat=4)

    runs = []
    for seed in args.seeds:
        for variant, extra in VARIANTS.items():
            train_file = balanced if variant == "uniopd" else data / "train.jsonl"
            out = run / f"{variant}_seed{seed}"
            cfg = config(f"model.student={student}", f"teachers.0.model_path={teacher}",
                         f"data.train_files=[{train_file}]", f"logging.run_dir={out}",
                         f"checkpoint.dir={out / 'checkpoints'}", "checkpoint.save_every=0",
                         f"trainer.steps={args.opd_steps}", "trainer.prompts_per_step=16",
                         "rollout.n_samples_per_prompt=8", f"optimizer.lr={args.opd_lr}",
                         "optimizer.warmup_steps=5", "trainer.eval_every=0",
                         f"trainer.seed={seed}", f"data.seed={seed}", *extra)
            t = time.perf_counter()
            trainer = Trainer(cfg, build_learner(cfg))
            history = trainer.train()
            row = {"variant": variant, "seed": seed, "seconds": round(time.perf_counter() - t, 1),
                   **{f"acc_{k}": trainer.evaluate(recs) for k, recs in evals.items()},
                   "groups_violated_mean": statistics.fmean(h["groups_violated"] for h in history),
                   "mean_shift_mean": statistics.fmean(h["mean_shift"] for h in history)}
            print(f"[ablation] {row}", flush=True)
            runs.append(row)

    summary = {}
    for variant in ["student_before", *VARIANTS]:
        rows = [r for r in runs if r["variant"] == variant]
        for key in ("all", "slice", "rest"):
            vals = [results["student_before"][key]] if variant == "student_before" else [r[f"acc_{key}"] for r in rows]
            summary.setdefault(variant, {})[key] = {
                "mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    report = {
        "benchmark": "recipe_ablation", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(), "seeds": args.seeds, "args": vars(args),
        "wall_seconds": round(time.perf_counter() - t0, 1), "results": results, "runs": runs, "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    s, r = report["summary"], report["results"]
    lines = [
        f"# Recipe ablation ({report['date']}, seeds {report['seeds']}, {report['wall_seconds']} s)",
        "",
        f"Held-out greedy accuracy on the arithmetic task; the teacher is trained to be wrong "
        f"({report['args']['teacher_offset']:+d}) on the slice `{report['args']['slice']}` "
        "(examples/arithmetic/task.py::SLICES); the student, trained on a noisy annotator's answers, gets "
        "most subtractions wrong (see examples/arithmetic/task.py). Mean ± population std over OPD seeds.",
        "",
        f"Teacher: all {r['teacher']['all']:.3f}, slice {r['teacher']['slice']:.3f}, rest {r['teacher']['rest']:.3f}.",
        "",
        "| variant | all | slice (teacher wrong) | rest |",
        "|---|---|---|---|",
    ]
    for variant, row in s.items():
        cells = [f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" for k in ("all", "slice", "rest")]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
