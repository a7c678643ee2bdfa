"""The Uni-OPD loop: sample -> verify -> score -> advantages -> train -> sync.

    uniopd-mcore train --config examples/configs/demo_cpu.yaml               # one process, CPU
    torchrun --nproc-per-node 8 -m uniopd_mcore.cli train --config examples/configs/qwen3_30b_a3b_to_4b.yaml

One step (DESIGN.md section 1):
  1. the rollout engine samples G responses for each of the step's prompts (token ids);
  2. the verifier of each prompt's data source says whether each response is correct;
  3. the teacher of each data source scores every response token (sentinel -100 on failure);
  4. the learner recomputes the student's log-probs (the "old" policy of the PPO ratio);
  5. the recipe turns them into token advantages with margin calibration, and balances each
     group's correct/incorrect sequences;
  6. PPO-clip loss, one optimizer step over the whole rollout;
  7. the learner's weights go to the rollout engine by Hugging Face name.

Rank 0 drives the engines (generation, verification, teacher calls) and broadcasts the finished
rollouts; every rank then trains on its data-parallel share. Everything random is seeded from
(seed, step), so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from uniopd_mcore.config import JobConfig, save_config
from uniopd_mcore.data.packing import PackedBatch, make_micro_batches, pack_sequences
from uniopd_mcore.data.prompts import PromptRecord, load_prompts, render_prompt
from uniopd_mcore.metrics import MetricsLogger
from uniopd_mcore.recipe import balance_groups, policy_loss, uniopd_advantages
from uniopd_mcore.rewards import get_verifier
from uniopd_mcore.rollout.base import SamplingParams

TEACHER_FAILED = -100.0


@dataclass
class Rollout:
    """One sampled response: the only contract between the engines and the learner."""

    group_id: int  # index of its prompt within the step
    source: str
    answer: str
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    finish_reason: str
    correct: bool = False
    teacher_logprobs: list[float] = field(default_factory=list)


def step_seed(seed: int, step: int, salt: int) -> int:
    """A distinct, reproducible seed for each (run, step, purpose)."""
    return (seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1)


class PromptSampler:
    """Walks the prompts in a new seeded permutation each epoch; its cursor is checkpointed."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        if n == 0:
            raise ValueError("no training prompts")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.cursor = 0  # prompts handed out so far, over all epochs

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            epoch, pos = divmod(self.cursor, self.n)
            order = self._order(epoch)
            take = min(k - len(out), self.n - pos)
            out.extend(order[pos:pos + take])
            self.cursor += take
        return out


# ------------------------------------------------------------------------------------------------
# Building the pieces from the configuration


def build_rollout_engine(cfg: JobConfig, model_dir: str):
    if cfg.rollout.engine == "embedded":
        from uniopd_mcore.rollout.embedded import EmbeddedRolloutEngine

        return EmbeddedRolloutEngine(model_dir, device=_engine_device(), dtype=cfg.model.dtype)
    from uniopd_mcore.rollout.sglang import SGLangRolloutEngine  # GPU nodes only

    return SGLangRolloutEngine.from_config(cfg.rollout, model_dir)


def build_teachers(cfg: JobConfig):
    from uniopd_mcore.teachers.routing import TeacherRouter

    teachers = {}
    for t in cfg.teachers:
        if t.engine == "embedded":
            from uniopd_mcore.teachers.embedded import EmbeddedTeacher

            teachers[t.name] = EmbeddedTeacher(t.model_path, device=_engine_device(), dtype=cfg.model.dtype)
        elif t.engine == "sglang":
            from uniopd_mcore.teachers.sglang import SGLangTeacher

            teachers[t.name] = SGLangTeacher(t.servers, max_retries=t.max_retries, timeout_s=t.timeout_s,
                                             max_in_flight=t.max_in_flight)
        else:
            raise ValueError(f"teachers[{t.name}].engine: {t.engine!r} is not supported by the loop yet")
    routes = {source: s.teacher for source, s in cfg.data.sources.items()}
    return TeacherRouter(teachers, routes)


def _engine_device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------


class Trainer:
    """Owns the learner, the engines and the loop state; ``train()`` reads top to bottom."""

    def __init__(self, cfg: JobConfig, learner, *, rollout_engine=None, teacher=None):
        self.cfg = cfg
        self.learner = learner
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_driver = self.rank == 0
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"

        from transformers import AutoTokenizer

        # Data is read and checked before anything expensive happens: a bad row fails here.
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.student)
        self.stop_ids = tuple(i for i in [self.tokenizer.eos_token_id] if i is not None)
        self.prompts, self.prompt_ids = self._load(cfg.data.train_files)
        self.eval_prompts = self._load(cfg.data.eval_files)[0] if cfg.data.eval_files else []
        if cfg.trainer.eval_prompts:
            self.eval_prompts = self.eval_prompts[: cfg.trainer.eval_prompts]
        self.sampler = PromptSampler(len(self.prompts), cfg.data.seed, cfg.data.shuffle)
        self.verifiers = {src: get_verifier(s.verifier) for src, s in cfg.data.sources.items()}
        # Engines live on the driver rank only.
        self.rollout = rollout_engine if rollout_engine is not None else (
            build_rollout_engine(cfg, cfg.model.student) if self.is_driver else None)
        self.teacher = teacher if teacher is not None else (build_teachers(cfg) if self.is_driver else None)
        self.logger = MetricsLogger(self.run_dir, jsonl=cfg.logging.jsonl,
                                    tensorboard=cfg.logging.tensorboard, enabled=self.is_driver)
        self.step = 0

    def _load(self, files: list[str]) -> tuple[list[PromptRecord], list[list[int]]]:
        """Records and their token ids; prompts longer than rollout.max_prompt_len are dropped."""
        cfg = self.cfg
        records = load_prompts(files, cfg.data.sources)
        ids = [render_prompt(r, self.tokenizer, cfg.data.chat_template_kwargs) for r in records]
        keep = [i for i, p in enumerate(ids) if len(p) <= cfg.rollout.max_prompt_len]
        if len(keep) < len(records) and self.is_driver:
            print(f"[data] dropped {len(records) - len(keep)} of {len(records)} prompts from {files}: "
                  f"longer than rollout.max_prompt_len={cfg.rollout.max_prompt_len} tokens")
        return [records[i] for i in keep], [ids[i] for i in keep]

    # -------------------------------------------------------------------------------------------
    # the loop

    def train(self, on_step=None) -> list[dict[str, Any]]:
        cfg = self.cfg
        if self.is_driver:
            save_config(cfg, self.run_dir / "config.yaml")
        if cfg.checkpoint.resume:
            self.load_last_checkpoint()
        self.sync_weights()  # the engine must sample with exactly the learner's weights
        history = []
        progress = _progress(cfg.trainer.steps, self.step, enabled=self.is_driver and cfg.logging.progress)
        while self.step < cfg.trainer.steps:
            t0 = time.perf_counter()
            rollouts = self.generate_and_score()                       # steps 1-3
            metrics = self.train_on(rollouts)                          # steps 4-6
            self.sync_weights()                                        # step 7
            self.step += 1
            metrics["step_time"] = time.perf_counter() - t0
            metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_time"]
            if cfg.trainer.eval_every and (self.step % cfg.trainer.eval_every == 0
                                           or self.step == cfg.trainer.steps):
                metrics["eval_accuracy"] = self.evaluate()
            row = self.logger.log(self.step, metrics)
            history.append(row)
            if cfg.checkpoint.save_every and (self.step % cfg.checkpoint.save_every == 0
                                              or self.step == cfg.trainer.steps):
                self.save_checkpoint()
            progress.update(1)
            progress.set_postfix(acc=f"{metrics['accuracy']:.2f}", loss=f"{metrics['loss']:.3f}")
            if on_step is not None:
                on_step(self.step, row)
        progress.close()
        self.logger.close()
        return history

    # -------------------------------------------------------------------------------------------
    # steps 1-3: rollouts, verification, teacher scores (driver rank), then broadcast

    def generate_and_score(self) -> list[Rollout]:
        rollouts = None
        if self.is_driver:
            cfg = self.cfg
            indices = self.sampler.next(cfg.trainer.prompts_per_step)
            records = [self.prompts[i] for i in indices]
            prompt_ids = [self.prompt_ids[i] for i in indices]
            G = cfg.rollout.n_samples_per_prompt
            params = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                    max_new_tokens=cfg.rollout.max_response_len, stop_token_ids=self.stop_ids)
            gens = self.rollout.generate([p for p in prompt_ids for _ in range(G)], params,
                                         seed=step_seed(cfg.trainer.seed, self.step, 1))
            rollouts = []
            for k, gen in enumerate(gens):
                g = k // G
                rollouts.append(Rollout(group_id=g, source=records[g].source, answer=records[g].answer,
                                        prompt_ids=prompt_ids[g], response_ids=list(gen.token_ids),
                                        rollout_logprobs=list(gen.logprobs), finish_reason=gen.finish_reason))
            self.verify(rollouts)
            scores = self.teacher.score([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
                                        [r.source for r in rollouts])
            for r, s in zip(rollouts, scores):
                r.teacher_logprobs = s.tolist()
        else:
            self.sampler.next(self.cfg.trainer.prompts_per_step)  # keep every rank's cursor equal
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [rollouts]
            dist.broadcast_object_list(box, src=0)
            rollouts = box[0]
        return rollouts

    def verify(self, rollouts: list[Rollout]) -> None:
        for r in rollouts:
            text = self.tokenizer.decode(r.response_ids, skip_special_tokens=True)
            r.correct = bool(self.verifiers[r.source](text, r.answer))

    # -------------------------------------------------------------------------------------------
    # steps 4-6: learner log-probs, recipe, loss, optimizer step

    def pack(self, rollouts: list[Rollout]) -> PackedBatch:
        """prompt + response per sequence; per-token arrays aligned with the tokens."""
        seqs, loss_mask, teacher, rollout_lp = [], [], [], []
        for r in rollouts:
            P, R = len(r.prompt_ids), len(r.response_ids)
            seqs.append(r.prompt_ids + r.response_ids)
            loss_mask.append([0.0] * P + [1.0] * R)
            teacher.append([0.0] * P + list(r.teacher_logprobs))
            rollout_lp.append([0.0] * P + list(r.rollout_logprobs))
        return pack_sequences(seqs, loss_mask=loss_mask, teacher_logprobs=teacher, rollout_logprobs=rollout_lp)

    def train_on(self, rollouts: list[Rollout]) -> dict[str, Any]:
        cfg, rc = self.cfg, self.cfg.recipe
        learner = self.learner
        n_global = len(rollouts)
        correct_all = torch.tensor([r.correct for r in rollouts], dtype=torch.bool)
        group_all = torch.tensor([r.group_id for r in rollouts], dtype=torch.int64)

        # Online correctness-aware balancing (DESIGN 1.6) over whole groups, before the DP split;
        # the masked sequences still count in the margin statistics below.
        if rc.online_balance:
            gen = torch.Generator().manual_seed(step_seed(cfg.trainer.seed, self.step, 2))
            keep_all = balance_groups(group_all, correct_all, ratio=rc.balance_ratio, generator=gen)
        else:
            keep_all = torch.ones(n_global, dtype=torch.bool)

        # This rank's share of the sequences, split into token-budget micro-batches.
        dp_rank, dp_size, dp_group = _data_parallel()
        lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
        plan = make_micro_batches(lengths, cfg.trainer.max_tokens_per_micro_batch, dp_size)[dp_rank]
        local_index = [i for mb in plan for i in mb]
        local = [rollouts[i] for i in local_index]
        batch = self.pack(local)
        keep = keep_all[local_index]
        # positions of each micro-batch's sequences inside this rank's packed batch
        offsets, micro_index = 0, []
        for mb in plan:
            micro_index.append(list(range(offsets, offsets + len(mb))))
            offsets += len(mb)

        # Step 4: the student's log-probs before the update (the PPO "old" policy).
        old_logprobs = torch.cat(learner.compute_logprobs([batch.select(ix) for ix in micro_index]))
        teacher_lp = batch.token["teacher_logprobs"]
        loss_mask = batch.token["loss_mask"]

        # Step 5: token rewards, returns, margin calibration (DESIGN 1.1-1.5).
        adv = uniopd_advantages(
            old_logprobs, teacher_lp, loss_mask, batch.cu_seqlens, group_all[local_index],
            correct_all[local_index], margin=rc.margin, statistic=rc.statistic, direction=rc.direction,
            calibration=rc.calibration, min_retain_ratio=rc.min_retain_ratio,
            dp_group=dp_group if dp_size > 1 else None, backend=rc.backend)

        # Sequences that train: kept by the balancer and by the greedy mask.
        seq_train = keep & adv.sequence_mask
        batch.token["train_mask"] = loss_mask * seq_train[batch.sequence_ids()].to(loss_mask.dtype)
        batch.token["old_logprobs"] = old_logprobs
        batch.token["advantages"] = adv.advantages

        # Step 6: PPO-clip over micro-batches, normalised by the global number of sequences so the
        # gradient does not depend on how the batch was split.
        micro = [batch.select(ix) for ix in micro_index]

        def loss_fn(logprobs: torch.Tensor, mb: PackedBatch):
            t = mb.token
            return policy_loss(logprobs, t["old_logprobs"], t["advantages"], t["train_mask"], mb.cu_seqlens,
                               t["teacher_logprobs"], eps_low=rc.eps_low, eps_high=rc.eps_high,
                               teacher_gap_clip=rc.teacher_gap_clip, num_sequences=n_global)

        train_metrics = learner.train_step(micro, loss_fn)

        # Step metrics (from the full rollout on the driver; the local shard otherwise).
        tokens_resp = sum(len(r.response_ids) for r in rollouts)
        valid = (loss_mask > 0) & (teacher_lp != TEACHER_FAILED)
        gap = (teacher_lp - old_logprobs)[valid]
        # the learner's own counters ("step", the loss-token count "tokens") are renamed or dropped
        learner_metrics = {("loss_tokens" if k == "tokens" else k): v
                           for k, v in train_metrics.items() if k != "step"}
        return {
            **learner_metrics,
            "accuracy": correct_all.float().mean().item(),
            "reward": gap.mean().item() if gap.numel() else 0.0,
            "teacher_student_gap": gap.abs().mean().item() if gap.numel() else 0.0,
            "return_mean": adv.returns.mean().item() if adv.returns.numel() else 0.0,
            "groups_checked": int(adv.groups_checked),
            "groups_violated": int(adv.groups_violated),
            "mean_shift": float(adv.mean_shift),
            "kept_fraction": keep_all.float().mean().item(),
            "teacher_failed_tokens": int(((teacher_lp == TEACHER_FAILED) & (loss_mask > 0)).sum().item()),
            # engine vs learner log-probs of the same tokens: ~0 when weight sync works (bf16
            # engines on GPU show a small, stable gap)
            "rollout_logprob_diff": (batch.token["rollout_logprobs"] - old_logprobs)[loss_mask > 0].abs().mean().item()
            if bool((loss_mask > 0).any()) else 0.0,
            "response_length": tokens_resp / max(1, n_global),
            "tokens": sum(lengths),
        }

    # -------------------------------------------------------------------------------------------
    # step 7 and the rest

    def sync_weights(self) -> None:
        """Stream the learner's weights, by Hugging Face name, into the rollout engine."""
        named = self.learner.export_hf_weights()  # collective: every rank walks it
        if self.is_driver:
            self.rollout.update_weights(named)
        else:
            for _ in named:
                pass

    @torch.no_grad()
    def evaluate(self, records: list[PromptRecord] | None = None) -> float:
        """Held-out accuracy with greedy decoding (driver rank; broadcast to the others)."""
        records = self.eval_prompts if records is None else records
        acc = float("nan")
        if self.is_driver and records:
            acc = evaluate_accuracy(self.rollout, self.tokenizer, records, self.verifiers,
                                    self.cfg.rollout.max_response_len, self.stop_ids,
                                    self.cfg.data.chat_template_kwargs)
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [acc]
            dist.broadcast_object_list(box, src=0)
            acc = box[0]
        return acc

    def save_checkpoint(self) -> None:
        state = {"step": self.step, "sampler_cursor": self.sampler.cursor}
        self.learner.save_checkpoint(str(self.ckpt_dir / f"step_{self.step:06d}"), user_state=state)
        keep = self.cfg.checkpoint.keep_last
        if self.is_driver and keep > 0:
            import shutil

            for old in self._checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def _checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (an interrupted save has no completion marker)."""
        from uniopd_mcore.learner.checkpoint import list_checkpoints

        return list_checkpoints(self.ckpt_dir, "step_*")

    def load_last_checkpoint(self) -> bool:
        steps = self._checkpoints()
        if not steps:
            if self.is_driver:
                print(f"[resume] no checkpoint in {self.ckpt_dir}: starting from step 0")
            return False
        state = self.learner.load_checkpoint(str(steps[-1]))
        self.step = int(state["step"])
        self.sampler.cursor = int(state["sampler_cursor"])
        self.logger.truncate_after(self.step)
        if self.is_driver:
            print(f"[resume] continuing from {steps[-1]} (step {self.step})")
        return True


def evaluate_accuracy(engine, tokenizer, records, verifiers, max_new_tokens: int, stop_ids,
                      chat_template_kwargs=None) -> float:
    prompts = [render_prompt(r, tokenizer, chat_template_kwargs) for r in records]
    gens = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                                                   stop_token_ids=stop_ids), seed=0)
    hits = 0
    for rec, gen in zip(records, gens):
        text = tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        hits += bool(verifiers[rec.source](text, rec.answer))
    return hits / max(1, len(records))


def _data_parallel():
    """(rank, size, group) of this process in the data-parallel group (Megatron's, when set up)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
                parallel_state.get_data_parallel_group())
    return 0, 1, None


class _NoProgress:
    def update(self, n): ...
    def set_postfix(self, **kw): ...
    def close(self): ...


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="uni-opd", unit="step", dynamic_ncols=True)
