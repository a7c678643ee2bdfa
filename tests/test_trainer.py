"""The Uni-OPD loop at tiny size on CPU: weight sync after every step, and kill + resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from examples.arithmetic.demo import CONFIG, init_model
from examples.arithmetic.task import make_problems, write_jsonl
from examples.arithmetic.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
# Numbers that depend on the machine's speed, not on the run's state.
TIMING_KEYS = {"step_time", "tokens_per_s"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    tok = root / "tokenizer"
    build_tokenizer(tok)
    train = make_problems(40, seed=0)
    held = make_problems(8, seed=1, exclude=[p.prompt for p in train])
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "eval.jsonl", held)
    arch = dict(hidden=32, layers=2, heads=4, kv_heads=2)
    student = init_model(root / "student", tok, seed=1, **arch)
    teacher = init_model(root / "teacher", tok, seed=2, **arch)
    return root, student, teacher


def overrides(root: Path, student: Path, teacher: Path, run_dir: Path, steps: int) -> list[str]:
    return [
        f"model.student={student}", f"teachers.0.model_path={teacher}",
        f"data.train_files=[{root / 'train.jsonl'}]", f"data.eval_files=[{root / 'eval.jsonl'}]",
        f"logging.run_dir={run_dir}", f"checkpoint.dir={run_dir / 'ckpt'}", "logging.progress=false",
        f"trainer.steps={steps}", "trainer.prompts_per_step=3", "rollout.n_samples_per_prompt=4",
        "rollout.max_response_len=6", "trainer.eval_every=2", "checkpoint.save_every=2", "checkpoint.keep_last=1",
        "optimizer.lr=1e-3", "optimizer.warmup_steps=0", "trainer.max_tokens_per_micro_batch=64",
    ]


def test_rollout_engine_samples_with_the_learners_weights(tiny_run, tmp_path):
    from uniopd_mcore.config import load_config
    from uniopd_mcore.run import build_learner
    from uniopd_mcore.trainer import Trainer

    root, student, teacher = tiny_run
    cfg = load_config(str(CONFIG), overrides(root, student, teacher, tmp_path / "run", steps=3))
    learner = build_learner(cfg)
    trainer = Trainer(cfg, learner)
    initial = {k: v.clone() for k, v in trainer.rollout.state_dict_for_check().items()}
    checked = []

    def check(step, row):
        engine = trainer.rollout.state_dict_for_check()
        exported = dict(learner.export_hf_weights())
        assert set(exported) <= set(engine)
        for name, tensor in exported.items():
            torch.testing.assert_close(engine[name], tensor.to(engine[name].dtype), rtol=0, atol=0,
                                       msg=f"step {step}: engine weight {name} != learner weight")
        checked.append(step)

    history = trainer.train(on_step=check)
    assert checked == [1, 2, 3]
    assert len(history) == 3
    changed = [n for n, t in trainer.rollout.state_dict_for_check().items() if not torch.equal(t, initial[n])]
    assert changed, "three optimizer steps left every weight unchanged"
    for row in history:
        for key in ("accuracy", "reward", "groups_checked", "groups_violated", "mean_shift", "clip_frac",
                    "teacher_gap_clip_frac", "teacher_student_gap", "tokens_per_s", "step_time", "loss"):
            assert key in row, key
    assert "eval_accuracy" in history[1]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


RUNNER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    from uniopd_mcore.config import load_config
    from uniopd_mcore.run import build_learner
    from uniopd_mcore.trainer import Trainer

    cfg = load_config({config!r}, sys.argv[2:])
    kill_at = int(sys.argv[1])

    def hard_kill(step, row):
        if step == kill_at:
            os._exit(137)  # like SIGKILL: no cleanup, no checkpoint for this step

    Trainer(cfg, build_learner(cfg)).train(on_step=hard_kill)
    """
)


def run_loop(script: Path, kill_at: int, args: list[str]) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(script), str(kill_at), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode not in (0, 137):
        raise AssertionError(f"loop failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.returncode


def deterministic(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_kill_and_resume_repeats_the_uninterrupted_run(tiny_run, tmp_path):
    root, student, teacher = tiny_run
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(repo=str(REPO), config=str(CONFIG)))
    steps = 5

    straight = tmp_path / "straight"
    assert run_loop(script, -1, overrides(root, student, teacher, straight, steps)) == 0

    # Killed after step 3 was logged: the last checkpoint is step 2, so step 3 is done twice.
    resumed = tmp_path / "resumed"
    args = overrides(root, student, teacher, resumed, steps)
    assert run_loop(script, 3, args) == 137
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in (resumed / "ckpt").iterdir()) == ["step_000002"]
    assert run_loop(script, -1, args + ["checkpoint.resume=true"]) == 0

    a, b = deterministic(straight / "metrics.jsonl"), deterministic(resumed / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert a == b


def test_policy_gradient_of_a_step_equals_hf_autograd(tiny_run, tmp_path):
    """The loop's assembly (packing, old log-probs, advantages, micro-batches, Megatron backward)
    gives the gradient of the Uni-OPD loss that plain autograd on the HF model gives."""
    from transformers import AutoModelForCausalLM

    from uniopd_mcore.config import load_config
    from uniopd_mcore.learner.testing import export_hf_grads
    from uniopd_mcore.run import build_learner
    from uniopd_mcore.trainer import Trainer

    root, student, teacher = tiny_run
    args = overrides(root, student, teacher, tmp_path / "run", steps=1) + [
        "optimizer.lr=1e-12", "optimizer.clip_grad=1e9", "trainer.max_tokens_per_micro_batch=24"]
    cfg = load_config(str(CONFIG), args)
    trainer = Trainer(cfg, build_learner(cfg))
    trainer.sync_weights()
    seen = {}
    step = trainer.learner.train_step

    def spy(micro, loss_fn):
        seen.update(micro=micro, loss_fn=loss_fn)
        return step(micro, loss_fn)

    trainer.learner.train_step = spy
    metrics = trainer.train_on(trainer.generate_and_score())
    assert len(seen["micro"]) > 1
    megatron = export_hf_grads(trainer.learner)

    hf = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    total = 0.0
    for mb in seen["micro"]:
        cu = mb.cu_seqlens.long()
        per_token = []
        for i in range(mb.num_sequences):
            ids = mb.input_ids[cu[i]:cu[i + 1]]
            logp = torch.log_softmax(hf(ids[None]).logits[0].float(), -1)
            tok = torch.zeros(len(ids))
            tok[1:] = logp[:-1].gather(-1, ids[1:, None]).squeeze(-1)
            per_token.append(tok)
        total = total + seen["loss_fn"](torch.cat(per_token), mb)[0]
    total.backward()
    assert abs(float(total) - metrics["loss"]) < 1e-5
    for name, p in hf.named_parameters():
        got, want = megatron[name], p.grad
        if name == "model.embed_tokens.weight":
            # HF's nn.Embedding(padding_idx=pad) never gives the pad row an input gradient;
            # Megatron's embedding has no padding_idx, and random tiny models do sample <pad>.
            keep = torch.arange(want.size(0)) != hf.config.pad_token_id
            got, want = got[keep], want[keep]
        diff = float((got - want).abs().max())
        assert diff <= 1e-6 + 1e-4 * float(want.abs().max()), f"{name}: max abs diff {diff}"
