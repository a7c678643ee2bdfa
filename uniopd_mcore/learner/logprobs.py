"""Per-token log-probabilities from vocab-parallel logits, without gathering the vocabulary.

Each TP rank holds logits for the vocabulary slice [vocab_start, vocab_start + V_local). For a
target y:  log p(y) = logit_y - (m + log sum_r sum_v exp(logit_v - m)),  m = global max.
Three tiny all-reduces over the TP group (max, sum-exp, target logit) replace an all-gather of
[T, V]. The sums use an all-reduce whose backward is the identity: every TP rank holds the same
replicated loss, so each rank's partial sum gets the full upstream gradient exactly once.

`backend="torch"` is this reference; `backend="triton"` plugs in
`uniopd_kernels.token_logprobs(logits, targets, vocab_start=, tp_group=)`; a callable with that
signature works too.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.distributed as dist

LogprobBackend = Union[str, Callable[..., torch.Tensor]]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group forward, identity backward (the result feeds a replicated loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _group_size(group) -> int:
    return 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)


def torch_token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int = 0,
    tp_group=None,
) -> torch.Tensor:
    """float32 [T] log p(targets[t]) under softmax(logits[t]) over the full (TP-sharded) vocab.

    logits [T, V_local] (any float dtype, computed in float32), targets [T] global token ids.
    Differentiable w.r.t. logits.
    """
    x = logits.float()
    local_v = x.size(-1)
    parallel = _group_size(tp_group) > 1
    # the max only stabilises the exponentials: its gradient cancels exactly, so detach it
    if local_v > 0:
        m = x.detach().max(dim=-1).values
    else:  # a rank whose slice is all vocabulary padding (tiny vocabularies)
        m = torch.full(x.shape[:-1], float("-inf"), device=x.device)
    if parallel:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    sum_exp = torch.exp(x - m.unsqueeze(-1)).sum(dim=-1)
    local_t = targets - vocab_start
    owned = (local_t >= 0) & (local_t < local_v)
    if local_v > 0:
        target_logit = x.gather(-1, local_t.clamp(0, local_v - 1).unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))
    else:
        target_logit = x.sum(dim=-1)  # zeros, still connected to the graph
    if parallel:
        sum_exp = _AllReduceSum.apply(sum_exp, tp_group)
        target_logit = _AllReduceSum.apply(target_logit, tp_group)
    return target_logit - m - torch.log(sum_exp)


def vocab_parallel_token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int = 0,
    tp_group=None,
    backend: LogprobBackend = "torch",
) -> torch.Tensor:
    """Dispatch to the torch reference, the Triton kernel, or a user callable (same signature)."""
    if callable(backend):
        return backend(logits, targets, vocab_start=vocab_start, tp_group=tp_group)
    if backend == "torch":
        return torch_token_logprobs(logits, targets, vocab_start=vocab_start, tp_group=tp_group)
    if backend == "triton":
        import uniopd_kernels  # lazy: GPU or TRITON_INTERPRET=1

        return uniopd_kernels.token_logprobs(
            logits.contiguous(), targets, vocab_start=vocab_start, tp_group=tp_group
        )
    raise ValueError(f"unknown log-prob backend {backend!r}")


def shift_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """targets[t] = input_ids[t + 1]: the logits at t predict the next token (last one wraps)."""
    return torch.roll(input_ids, shifts=-1, dims=0)


def align_to_tokens(next_logprobs: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Move log p(x_{t+1} | x_<=t), computed at position t, to position t+1 (the contract's
    alignment) and zero the first token of every sequence, whose entry would otherwise hold the
    previous sequence's (meaningless) cross-sequence prediction."""
    out = torch.roll(next_logprobs, shifts=1, dims=0)
    first = torch.zeros_like(out, dtype=torch.bool)
    first[cu_seqlens[:-1].long()] = True
    return torch.where(first, torch.zeros_like(out), out)
