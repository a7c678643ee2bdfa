"""Entry points behind the CLI: build the learner from the configuration and run a job.

    run_train(cfg)            Uni-OPD (uniopd_mcore/trainer.py)
    run_sft(cfg, out_dir)     supervised fine-tuning with the same learner, then an HF checkpoint
    run_export(...)           learner checkpoint -> HF safetensors
    run_balance_data(...)     offline difficulty-aware balancing of the training prompts
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

import torch

from uniopd_mcore.config import JobConfig, save_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config.model.attention_backend -> the learner's layer-spec backend
LAYER_BACKENDS = {"auto": "auto", "te": "te", "sdpa": "portable", "flash": "portable"}


def build_learner(cfg: JobConfig, hf_dir: str | None = None, *, total_steps: int | None = None):
    """Initialise the parallel state (gloo on CPU, nccl on GPU) and the Megatron-Core learner."""
    from uniopd_mcore.learner import Learner, OptimConfig, init_distributed

    init_distributed(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                     seed=cfg.model.seed)
    o = cfg.optimizer
    optim = OptimConfig(name=o.name, lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps, decay_style=o.lr_schedule,
                        total_steps=total_steps or cfg.trainer.steps, weight_decay=o.weight_decay,
                        betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, clip_grad=o.clip_grad)
    # bf16 compute has no fast path on CPU; the CPU learner trains in float32.
    dtype = DTYPES[cfg.model.dtype] if torch.cuda.is_available() else torch.float32
    logprob_backend = {"auto": "triton" if torch.cuda.is_available() else "torch"}.get(
        cfg.recipe.backend, cfg.recipe.backend)
    return Learner(hf_dir or cfg.model.student, optim=optim, params_dtype=dtype,
                   sequence_parallel=cfg.parallel.sequence_parallel,
                   backend=LAYER_BACKENDS[cfg.model.attention_backend], logprob_backend=logprob_backend)


def run_train(cfg: JobConfig):
    from uniopd_mcore.trainer import Trainer

    learner = build_learner(cfg)
    return Trainer(cfg, learner).train()


# ------------------------------------------------------------------------------------------------
# HF checkpoints


def write_hf_checkpoint(named_tensors: Iterable[tuple[str, torch.Tensor]], template_dir: str | os.PathLike,
                        out_dir: str | os.PathLike, *, shard_bytes: int = 2 << 30, write: bool = True) -> Path:
    """Write a Hugging Face checkpoint directory from a stream of (name, tensor).

    Tensors are written in safetensors shards of at most ``shard_bytes`` as they arrive, so the
    whole model is never held at once; config and tokenizer files come from ``template_dir``.
    ``write=False`` only drains the stream (the non-writing ranks of a collective export).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if write:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    shard: dict[str, torch.Tensor] = {}
    size, names, weight_map = 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            fname = f"model-{len(names) + 1:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            names.append(fname)
            weight_map.update({k: fname for k in shard})
        shard, size = {}, 0

    for name, tensor in named_tensors:
        if not write:
            continue
        t = tensor.detach().cpu().contiguous()
        if size + t.numel() * t.element_size() > shard_bytes:
            flush()
        shard[name] = t.clone()
        size += t.numel() * t.element_size()
    if not write:
        return out
    flush()
    # rename shards into the HF naming model-0000i-of-0000n.safetensors
    final = {}
    for i, fname in enumerate(names, start=1):
        new = f"model-{i:05d}-of-{len(names):05d}.safetensors" if len(names) > 1 else "model.safetensors"
        os.replace(tmp / fname, tmp / new)
        final[fname] = new
    if len(names) > 1:
        index = {"metadata": {}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f in Path(template_dir).iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".index.json", ".pt")):
            shutil.copy2(f, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def save_learner_as_hf(learner, template_dir: str, out_dir: str) -> Path:
    """Collective: every rank walks the export; global rank 0 writes."""
    import torch.distributed as dist

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    path = write_hf_checkpoint(learner.export_hf_weights(), template_dir, out_dir, write=rank0)
    if dist.is_initialized():
        dist.barrier()
    return path


def run_export(checkpoint: str, hf_template: str, out_dir: str, *, tp: int = 1, pp: int = 1) -> Path:
    """Learner checkpoint -> HF safetensors in ``out_dir``.

    ``checkpoint`` is a finished learner checkpoint (any TP/PP/DP layout: distributed checkpoints
    reshard on load) or a directory of them (the newest finished one is used). The model is
    rebuilt at ``tp``/``pp``; with tp*pp > 1 outside an existing torch.distributed world (e.g. not
    under torchrun), tp*pp local processes are started for it. Only the weights are loaded.
    """
    import torch.distributed as dist

    from uniopd_mcore.learner.checkpoint import is_finished, latest_checkpoint

    ckpt = Path(checkpoint)
    if not is_finished(ckpt):
        latest = latest_checkpoint(ckpt)
        if latest is None:
            raise FileNotFoundError(f"{ckpt}: not a finished learner checkpoint, and none inside it")
        ckpt = latest
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp * pp > 1 and not dist.is_initialized() and world == 1:
        from uniopd_mcore.learner.parallel import run_local_processes

        paths = run_local_processes(_export_worker, tp * pp, (str(ckpt), hf_template, out_dir, tp, pp))
        return Path(paths[0])
    return _export_here(str(ckpt), hf_template, out_dir, tp, pp)


def _export_here(checkpoint: str, hf_template: str, out_dir: str, tp: int, pp: int) -> Path:
    from uniopd_mcore.learner import Learner, init_distributed
    from uniopd_mcore.learner.checkpoint import read_info

    init_distributed(tp, pp)
    # the parameters in the dtype they were trained in; the weights come from the checkpoint,
    # so the template needs only config.json (and tokenizer files to copy)
    dtype = getattr(torch, read_info(checkpoint).get("params_dtype", "float32"))
    learner = Learner(hf_template, params_dtype=dtype, load_weights=False)
    # the optimizer settings of this throw-away learner need not match the training run's
    learner.load_checkpoint(checkpoint, load_optimizer=False, load_rng=False)
    return save_learner_as_hf(learner, hf_template, out_dir)


def _export_worker(rank: int, world: int, checkpoint: str, hf_template: str, out_dir: str, tp: int, pp: int) -> str:
    return str(_export_here(checkpoint, hf_template, out_dir, tp, pp))


# ------------------------------------------------------------------------------------------------
# SFT


def sft_batches(records, tokenizer, indices, max_tokens: int, chat_template_kwargs=None):
    """Pack prompt + answer + eos for the given records; loss on the answer and eos tokens."""
    from uniopd_mcore.data.packing import make_micro_batches, pack_sequences
    from uniopd_mcore.data.prompts import render_prompt

    seqs, masks = [], []
    for i in indices:
        r = records[i]
        p = render_prompt(r, tokenizer, chat_template_kwargs)
        a = tokenizer.encode(r.answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(p + a)
        masks.append([0.0] * len(p) + [1.0] * len(a))
    batch = pack_sequences(seqs, loss_mask=masks)
    plan = make_micro_batches([len(s) for s in seqs], max_tokens, 1)[0]
    return [batch.select(mb) for mb in plan]


def run_sft(cfg: JobConfig, out_dir: str, *, log_every: int = 25, eval_fn=None) -> Path:
    """Supervised fine-tuning on data.train_files (prompt -> answer), then an HF checkpoint.

    Each step draws trainer.prompts_per_step records; the loss is the per-sequence mean NLL of
    the answer tokens, averaged over sequences. Single data-parallel replica for now.
    """
    from transformers import AutoTokenizer

    from uniopd_mcore.data.prompts import load_prompts
    from uniopd_mcore.metrics import MetricsLogger
    from uniopd_mcore.trainer import PromptSampler, _progress

    records = load_prompts(cfg.data.train_files, cfg.data.sources)
    learner = build_learner(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.student)
    sampler = PromptSampler(len(records), cfg.data.seed, cfg.data.shuffle)
    log_dir = Path(out_dir).with_name(Path(out_dir).name + "_sft_logs")
    logger = MetricsLogger(log_dir, jsonl=True, tensorboard=False)
    bar = _progress(cfg.trainer.steps, 0, enabled=cfg.logging.progress)
    t0 = time.perf_counter()
    for step in range(1, cfg.trainer.steps + 1):
        micro = sft_batches(records, tokenizer, sampler.next(cfg.trainer.prompts_per_step),
                            cfg.trainer.max_tokens_per_micro_batch, cfg.data.chat_template_kwargs)
        m = learner.sft_step(micro)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}")
        if step % log_every == 0 or step == cfg.trainer.steps:
            row = {"loss": m["loss"], "lr": m["lr"], "elapsed_s": time.perf_counter() - t0}
            if eval_fn is not None:
                row.update(eval_fn(learner))
            logger.log(step, row)
    bar.close()
    logger.close()
    save_config(cfg, log_dir / "config.yaml")
    return save_learner_as_hf(learner, cfg.model.student, out_dir)


# ------------------------------------------------------------------------------------------------
# Offline difficulty-aware balancing (DESIGN 1.7)


def estimate_pass_rates(engine, tokenizer, records, verifiers, k: int, max_new_tokens: int,
                        temperature: float = 1.0, seed: int = 0, chat_template_kwargs=None) -> torch.Tensor:
    """Pass rate of each prompt over k sampled student rollouts."""
    from uniopd_mcore.data.prompts import render_prompt
    from uniopd_mcore.rollout.base import SamplingParams

    prompts = [render_prompt(r, tokenizer, chat_template_kwargs) for r in records]
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                            stop_token_ids=(tokenizer.eos_token_id,))
    gens = engine.generate([p for p in prompts for _ in range(k)], params, seed=seed)
    hits = torch.zeros(len(records))
    for j, gen in enumerate(gens):
        rec = records[j // k]
        text = tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        hits[j // k] += float(verifiers[rec.source](text, rec.answer))
    return hits / k


def balance_file(records, pass_rates: torch.Tensor, out_path: str | os.PathLike, *, max_repeat: int = 8,
                 seed: int = 0) -> dict:
    """Write the upsampled prompt file and a before/after histogram picture beside it."""
    from uniopd_mcore.data.prompts import write_jsonl
    from uniopd_mcore.recipe import bin_labels, difficulty_balance, histogram

    repeats = difficulty_balance(pass_rates, max_repeat=max_repeat, seed=seed)
    out_records = [records[i] for i in range(len(records)) for _ in range(int(repeats[i]))]
    write_jsonl(out_records, out_path)
    before, after = histogram(pass_rates, repeats)
    png = Path(out_path).with_suffix(".png")
    _draw_histogram(before, after, bin_labels(len(before)), png)
    return {"prompts_in": len(records), "prompts_out": len(out_records), "before": before.tolist(),
            "after": after.tolist(), "histogram": str(png)}


def _draw_histogram(before, after, labels, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.arange(len(before)).numpy()
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(before) + 2), 3.2))
    ax.bar(x - 0.2, before, width=0.4, label="before")
    ax.bar(x + 0.2, after, width=0.4, label="after (upsampled)")
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("student pass rate")
    ax.set_ylabel("prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_balance_data(cfg: JobConfig, out_path: str, *, k: int | None = None) -> dict:
    """Estimate pass rates with k student rollouts per prompt, then upsample mid-difficulty prompts."""
    from transformers import AutoTokenizer

    from uniopd_mcore.data.prompts import load_prompts
    from uniopd_mcore.rewards import get_verifier
    from uniopd_mcore.trainer import build_rollout_engine

    records = load_prompts(cfg.data.train_files, cfg.data.sources)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.student)
    verifiers = {src: get_verifier(s.verifier) for src, s in cfg.data.sources.items()}
    engine = build_rollout_engine(cfg, cfg.model.student)
    rates = estimate_pass_rates(engine, tokenizer, records, verifiers, k or cfg.data.offline_samples_per_prompt,
                                cfg.rollout.max_response_len, cfg.rollout.temperature, cfg.data.seed,
                                cfg.data.chat_template_kwargs)
    info = balance_file(records, rates, out_path, max_repeat=cfg.data.offline_max_repeat, seed=cfg.data.seed)
    print(json.dumps(info))
    return info
