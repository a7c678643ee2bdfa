"""The learner: a Megatron-Core GPTModel trained on packed micro-batches.

    from uniopd_mcore.learner import init_distributed, Learner
    init_distributed(tp=2, pp=1)                     # torchrun, a test spawner, or one process
    learner = Learner.from_hf("path/to/qwen3", lr=1e-6, warmup_steps=5, weight_decay=0.1)
    old = learner.compute_logprobs(micro_batches)    # list of float32 [T_i]
    stats = learner.train_step(micro_batches, loss_fn)
    for name, tensor in learner.export_hf_weights(): ...

Every micro-batch goes through Megatron's `get_forward_backward_func()` (no pipelining, or 1F1B
when PP > 1), so the same code runs with any TP/PP. Log-probs come from the vocab-parallel logits
of the last stage without gathering the vocabulary (`learner.logprobs`).

Loss scaling: `loss_fn(logprobs, batch)` returns the micro-batch's share of the global loss (the
recipe normalises by the global number of sequences), so the step's objective is the plain sum
over micro-batches and DP ranks. Megatron divides each micro-batch loss by the number of
micro-batches and DDP averages gradients over DP; `_loss_func` multiplies both back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from uniopd_mcore.data.packing import PackedBatch
from uniopd_mcore.learner import hf_weights
from uniopd_mcore.learner.logprobs import (
    LogprobBackend,
    align_to_tokens,
    shift_targets,
    vocab_parallel_token_logprobs,
)
from uniopd_mcore.learner.model import ModelArch, build_gpt_model, packed_forward, transformer_config
from uniopd_mcore.learner.parallelize import ParallelConfig, apply_data_parallel
from uniopd_mcore.learner.spec import Backend

LossFn = Callable[[torch.Tensor, PackedBatch], "tuple[torch.Tensor, dict[str, Any]]"]


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | sgd (Megatron's optimizers)
    lr: float = 1e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_style: str = "constant"  # constant | linear | cosine (Megatron's scheduler)
    total_steps: int | None = None  # needed by linear/cosine decay
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 1.0


class Learner:
    """Megatron-Core model + optimizer over an initialised parallel state (see parallel.py)."""

    def __init__(
        self,
        hf_dir: str,
        *,
        optim: OptimConfig | None = None,
        params_dtype: torch.dtype = torch.float32,
        sequence_parallel: bool = False,
        recompute: bool = False,
        distributed_optimizer: bool = False,
        backend: Backend = "auto",
        logprob_backend: LogprobBackend = "torch",
        make_vocab_size_divisible_by: int = 128,
        load_weights: bool = True,
        **config_overrides: Any,
    ):
        from transformers import AutoConfig

        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("call uniopd_mcore.learner.init_distributed(tp, pp) first")
        self.hf_dir = hf_dir
        self.hf_config = AutoConfig.from_pretrained(hf_dir)
        self.arch = ModelArch.from_hf_config(self.hf_config)
        self.optim_config = optim or OptimConfig()
        self.logprob_backend = logprob_backend
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.parallel = ParallelConfig(
            tp_size=self.tp_size,
            pp_size=self.pp_size,
            sequence_parallel=sequence_parallel,
            recompute=recompute,
            distributed_optimizer=distributed_optimizer,
        )
        # (perform_initialization stays on even when weights are loaded next: on the CPU path
        # Megatron sets the TP attributes of a weight, partition_dim etc., inside its initialiser)
        self.config = transformer_config(self.arch, self.parallel, params_dtype=params_dtype, **config_overrides)
        model = build_gpt_model(
            self.arch, self.config, backend=backend, make_vocab_size_divisible_by=make_vocab_size_divisible_by
        )
        self.bridge = hf_weights.make_bridge(
            self.hf_config, self.arch, tp_size=self.tp_size, dtype=params_dtype,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        )
        if load_weights:
            hf_weights.load_hf_weights(model, hf_dir, self.bridge)
        # one model chunk (no virtual pipeline stages yet)
        self.model = [apply_data_parallel(model, self.config, self.parallel)]
        oc = self.optim_config
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer=oc.name,
                lr=oc.lr,
                min_lr=oc.min_lr,
                weight_decay=oc.weight_decay,
                adam_beta1=oc.betas[0],
                adam_beta2=oc.betas[1],
                adam_eps=oc.eps,
                clip_grad=oc.clip_grad,
                bf16=params_dtype == torch.bfloat16,
                fp16=params_dtype == torch.float16,
                params_dtype=params_dtype,
                use_distributed_optimizer=distributed_optimizer,
            ),
            self.model,
        )
        # Warm-up: step k (0-based) uses lr * (k+1) / warmup_steps, since the scheduler is
        # advanced before each optimizer step.
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if oc.warmup_steps > 0 else oc.lr,
            max_lr=oc.lr,
            min_lr=oc.min_lr,
            lr_warmup_steps=oc.warmup_steps,
            lr_decay_steps=max(oc.total_steps or 0, oc.warmup_steps + 1),
            lr_decay_style=oc.decay_style,
            start_wd=oc.weight_decay,
            end_wd=oc.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
        )
        self.num_steps = 0

    @classmethod
    def from_hf(cls, hf_dir: str, **kwargs: Any) -> "Learner":
        """Learner for the Hugging Face checkpoint `hf_dir`. OptimConfig fields (lr, warmup_steps,
        weight_decay, betas, eps, clip_grad, min_lr, decay_style, total_steps) may be given
        directly; everything else goes to __init__."""
        names = {f.name for f in dataclasses.fields(OptimConfig)}
        optim = OptimConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        optim.betas = tuple(optim.betas)
        return cls(hf_dir, optim=optim, **kwargs)

    # ------------------------------------------------------------------------------------------
    # log-probs

    @property
    def module(self) -> torch.nn.Module:
        return self.model[0].module

    def _token_logprobs(self, logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """[T] float32 log p(x_t | x_<t) from local vocab-parallel logits [T, V_padded/TP]."""
        local_v = logits.size(-1)
        vocab_start = parallel_state.get_tensor_model_parallel_rank() * local_v
        # the padding rows of the vocabulary are not part of the model's distribution
        valid = min(local_v, max(0, self.arch.vocab_size - vocab_start))
        next_lp = vocab_parallel_token_logprobs(
            logits[:, :valid],
            shift_targets(batch.input_ids),
            vocab_start=vocab_start,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            backend=self.logprob_backend,
        )
        return align_to_tokens(next_lp, batch.cu_seqlens)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def _device_batch(self, batch: PackedBatch) -> PackedBatch:
        return batch if self.device.type == "cpu" else batch.to(self.device)

    def _forward_step(self, loss_func: Callable, data_iterator: Iterator[PackedBatch], model: torch.nn.Module):
        batch = self._device_batch(next(data_iterator))
        output = packed_forward(model, batch.input_ids, batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        return output, partial(loss_func, batch)

    def _run(self, micro_batches: Sequence[PackedBatch], loss_func: Callable, forward_only: bool) -> list[Any]:
        fwd_bwd = get_forward_backward_func()
        return fwd_bwd(
            forward_step_func=partial(self._forward_step, loss_func),
            data_iterator=iter(micro_batches),
            model=self.model,
            num_microbatches=len(micro_batches),
            seq_length=max(mb.num_tokens for mb in micro_batches),  # shapes travel with the tensors
            micro_batch_size=1,
            forward_only=forward_only,
        )

    def compute_logprobs(self, micro_batches: Sequence[PackedBatch]) -> list[torch.Tensor]:
        """Per-token float32 log-probs of every micro-batch (no grad), on every rank."""
        if not micro_batches:
            return []

        def loss_func(batch: PackedBatch, logits: torch.Tensor):
            lp = self._token_logprobs(logits, batch)
            return lp.new_zeros(()), {"logprobs": lp.detach()}

        for m in self.model:
            m.eval()
        with torch.no_grad():
            store = self._run(micro_batches, loss_func, forward_only=True)
        out = [d["logprobs"].float() for d in store] if parallel_state.is_pipeline_last_stage() else [
            torch.empty(mb.num_tokens, dtype=torch.float32, device=self.device) for mb in micro_batches
        ]
        if self.pp_size > 1:
            src = parallel_state.get_pipeline_model_parallel_last_rank()
            group = parallel_state.get_pipeline_model_parallel_group()
            for t in out:
                dist.broadcast(t, src=src, group=group)
        return [t.cpu() for t in out]

    def full_logits(self, micro_batches: Sequence[PackedBatch]) -> list[torch.Tensor] | None:
        """Debugging/tests only: float32 logits [T, vocab] gathered over TP (padding removed),
        on the last pipeline stage (None elsewhere). The training path never gathers them."""

        def loss_func(batch: PackedBatch, logits: torch.Tensor):
            group = parallel_state.get_tensor_model_parallel_group()
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits.contiguous(), group=group)
            full = torch.cat(parts, dim=-1)[:, : self.arch.vocab_size].float()
            return logits.new_zeros(()), {"logits": full}

        for m in self.model:
            m.eval()
        with torch.no_grad():
            store = self._run(micro_batches, loss_func, forward_only=True)
        if not parallel_state.is_pipeline_last_stage():
            return None
        return [d["logits"].cpu() for d in store]

    # ------------------------------------------------------------------------------------------
    # training

    def _loss_func(self, loss_fn: LossFn, num_microbatches: int, batch: PackedBatch, logits: torch.Tensor):
        logprobs = self._token_logprobs(logits, batch)
        loss, metrics = loss_fn(logprobs, batch)
        reported = {"loss": loss.detach().float()}
        for k, v in (metrics or {}).items():
            reported[k] = torch.as_tensor(v).detach().float()
        # undo Megatron's 1/num_microbatches and DDP's 1/dp: the objective is the plain sum
        return loss * (num_microbatches * self.dp_size), reported

    def train_step(self, micro_batches: Sequence[PackedBatch], loss_fn: LossFn) -> dict[str, float]:
        """Forward/backward every micro-batch, clip, one optimizer step. Every rank of a
        model-parallel group passes the same micro-batches (DP ranks pass their own). Returns:
        `loss` summed over micro-batches and DP ranks, other loss_fn metrics averaged over them,
        `grad_norm`, `lr`, `step`."""
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        store = self._run(micro_batches, partial(self._loss_func, loss_fn, len(micro_batches)), forward_only=False)
        self.scheduler.step(1)
        ok, grad_norm, _ = self.optimizer.step()
        self.num_steps += 1
        metrics = self._reduce_metrics(store, len(micro_batches))
        metrics.update(
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=float(self.optimizer.param_groups[0]["lr"]),
            update_successful=float(bool(ok)),
            step=float(self.num_steps),
        )
        return metrics

    def _reduce_metrics(self, store: list[dict[str, torch.Tensor]], num_microbatches: int) -> dict[str, float]:
        """Sum `loss`, average the rest, over micro-batches and DP; share with all PP stages."""
        result: dict[str, float] | None = None
        if parallel_state.is_pipeline_last_stage():
            keys = sorted(store[0]) if store else ["loss"]
            vals = torch.stack([torch.stack([d[k].reshape(()) for d in store]).sum() for k in keys]).double()
            counts = torch.tensor([float(num_microbatches)], dtype=torch.float64)
            if self.dp_size > 1:
                group = parallel_state.get_data_parallel_group()
                dist.all_reduce(vals, group=group)
                dist.all_reduce(counts, group=group)
            result = {k: float(v if k == "loss" else v / counts[0]) for k, v in zip(keys, vals)}
        if self.pp_size > 1:
            box = [result]
            dist.broadcast_object_list(
                box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
            result = box[0]
        return dict(result)

    def sft_step(self, micro_batches: Sequence[PackedBatch]) -> dict[str, float]:
        """Supervised step: per-sequence mean NLL over `loss_mask` tokens, mean over all
        sequences of the step (every micro-batch on every DP rank)."""
        n_local = torch.tensor([float(sum(mb.num_sequences for mb in micro_batches))], dtype=torch.float64)
        if self.dp_size > 1:
            dist.all_reduce(n_local, group=parallel_state.get_data_parallel_group())
        return self.train_step(micro_batches, partial(sft_loss, num_sequences=float(n_local[0])))

    # ------------------------------------------------------------------------------------------
    # weights and checkpoints

    def export_hf_weights(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, tensor) one parameter at a time; collective over the model-parallel group."""
        return hf_weights.export_hf_weights(self.module, self.bridge, dtype=dtype)

    def _optimizers(self) -> list[Any]:
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def state_dict(self) -> dict[str, Any]:
        rng = {
            "cpu": torch.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {
            "model": self.module.state_dict(),
            "optimizer": [_optimizer_state(opt) for opt in self._optimizers()],
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "step": self.num_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        for opt, opt_state in zip(self._optimizers(), state["optimizer"], strict=True):
            _load_optimizer_state(opt, opt_state)
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["cpu"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["rng"]["tracker"])
        if torch.cuda.is_available() and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        self.num_steps = state["step"]

    def save_checkpoint(self, path: str, user_state: dict[str, Any] | None = None) -> None:
        """Model, optimizer, scheduler, RNG and `user_state` in Megatron's distributed checkpoint
        format (learner.checkpoint): written into `<path>.tmp`, renamed to `path` once every rank
        has finished. Collective over all ranks; `user_state` is taken from global rank 0."""
        from uniopd_mcore.learner import checkpoint

        checkpoint.save_checkpoint(self, path, user_state)

    def load_checkpoint(self, path: str, *, load_optimizer: bool = True, load_rng: bool = True) -> dict[str, Any]:
        """Restore what save_checkpoint wrote, at this or any other TP/PP/DP layout (RNG states
        only at the same layout; otherwise a deterministic reseed); returns the user state.
        `load_optimizer=False` restores the model alone (export)."""
        from uniopd_mcore.learner import checkpoint

        return checkpoint.load_checkpoint(self, path, load_optimizer=load_optimizer, load_rng=load_rng)


def sft_loss(logprobs: torch.Tensor, batch: PackedBatch, *, num_sequences: float) -> tuple[torch.Tensor, dict]:
    """sum over sequences of (mean NLL over the sequence's loss_mask tokens) / num_sequences."""
    mask = batch["loss_mask"].to(logprobs.dtype)
    seq = batch.sequence_ids()
    n = batch.num_sequences
    nll = torch.zeros(n, dtype=logprobs.dtype, device=logprobs.device).index_add_(0, seq, -logprobs * mask)
    cnt = torch.zeros(n, dtype=logprobs.dtype, device=logprobs.device).index_add_(0, seq, mask)
    per_seq = nll / cnt.clamp(min=1.0)
    return per_seq.sum() / num_sequences, {"tokens": cnt.sum().detach()}


def _optimizer_state(opt: Any) -> dict[str, Any]:
    """Per-rank optimizer state. The distributed optimizer's own state_dict leaves the sharded
    parameter state (fp32 main params, Adam moments) to a separate gather-to-DP-rank-0 file;
    with the same parallel layout on reload, each rank's local shard is all we need."""
    if isinstance(opt, DistributedOptimizer):
        params = [p for g in opt.optimizer.param_groups for p in g["params"]]
        return {"inner": opt.optimizer.state_dict(), "main_params": [p.detach().clone() for p in params]}
    return {"megatron": opt.state_dict()}


def _load_optimizer_state(opt: Any, state: dict[str, Any]) -> None:
    if isinstance(opt, DistributedOptimizer):
        opt.optimizer.load_state_dict(state["inner"])
        params = [p for g in opt.optimizer.param_groups for p in g["params"]]
        with torch.no_grad():
            for p, saved in zip(params, state["main_params"], strict=True):
                p.copy_(saved)
    else:
        opt.load_state_dict(state["megatron"])
