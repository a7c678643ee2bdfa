"""Token log-probabilities with the LM head fused in: logits [T, V] never exist in full.

``linear_token_logprobs(hidden [T, H], weight [V_local, H], targets [T])`` equals
``token_logprobs(hidden @ weight.T, targets)`` but walks the tokens in chunks of C rows, so the
largest temporary is one [C, V_local] chunk of logits (Liger FLCE's token chunking).

Forward, per chunk: logits_c = h_c @ W^T (input dtype, fp32 accumulation inside the GEMM, exactly
what the unfused LM head emits), then the row kernel of ``token_logprobs`` gives the statistics.
Only the fp32 log-sum-exp (T floats) is saved.

Backward, per chunk (CCE style): recompute logits_c, let the backward row kernel write
dlogits_c = g_c * (onehot - p) in place over them, then dH_c = dlogits_c W and
dW += dlogits_c^T h_c. The per-token upstream gradient g is folded into dlogits *before* the sum
over tokens that forms dW (scaling dW afterwards cannot weight tokens differently). The recompute
costs one extra GEMM (8 T H V flops instead of 6) and buys memory = one chunk, since the upstream
gradient is only known in backward anyway. No extra ``token_weights`` argument is needed: a
per-token loss weight reaches this op as its upstream gradient.

Vocab-parallel: the chunk statistics of all chunks are merged across ``tp_group`` with one
all-gather after the forward loop. ``hidden`` is replicated on the TP ranks, so its gradient is the
sum of every rank's partial dlogits W_r; it is all-reduced here (what Megatron's
copy-to-tensor-parallel-region backward would do) unless ``tp_sum_grad_hidden=False`` because the
caller's own collective (e.g. a sequence-parallel all-gather's reduce-scatter) already sums it.
"""

from __future__ import annotations

import torch
import triton

from .token_logprobs import launch_forward
from .token_logprobs import merge_row_stats
from .token_logprobs import token_logprobs_backward

# ------------------------------------------------------------------------------------------------
# launchers (the row kernels live in token_logprobs.py; the GEMMs are cuBLAS through torch)
# ------------------------------------------------------------------------------------------------


def default_chunk_size(n_tokens: int, hidden_size: int, vocab_local: int) -> int:
    """Rows per chunk so that a chunk of logits is about as large as the hidden states.

    T = 65,536, H = 2,560, V = 151,936 -> 2,048 rows, a 622 MB bf16 chunk; a power of two keeps
    the number of distinct GEMM shapes (and cuBLAS heuristics) small.
    """
    rows = triton.cdiv(max(n_tokens, 1) * hidden_size, max(vocab_local, 1))
    return max(1, min(max(n_tokens, 1), max(256, triton.next_power_of_2(rows))))


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32: one rounding per chunk product instead of a bf16 running sum over chunks."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:  # torch >= 2.8 on CUDA: bf16 GEMM with an fp32 output, no fp32 copies of the inputs
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return (a @ b).float()


def linear_token_logprobs_forward(hidden, weight, targets, vocab_start, tp_group, chunk_size):
    """-> (logp fp32 [T], lse fp32 [T])."""
    n_tokens = hidden.shape[0]
    device = hidden.device
    logp = torch.empty(n_tokens, dtype=torch.float32, device=device)
    lse = torch.empty_like(logp)
    stats = torch.empty((n_tokens, 4), dtype=torch.float32, device=device) if tp_group is not None else None
    for c0 in range(0, n_tokens, chunk_size):
        c1 = min(c0 + chunk_size, n_tokens)
        logits = hidden[c0:c1] @ weight.t()  # [C, V_local]: the only vocab-sized temporary
        launch_forward(
            logits, targets[c0:c1], vocab_start, stats[c0:c1] if stats is not None else None,
            logp[c0:c1], lse[c0:c1], None,
        )  # fmt: skip
        del logits
    if stats is not None:
        x_y, lse, _ = merge_row_stats(stats, tp_group)
        logp = x_y - lse
    return logp, lse


def linear_token_logprobs_backward(
    hidden, weight, targets, lse, grad_logp, vocab_start, chunk_size, need_hidden, need_weight
):
    """-> (dH or None, dW or None), each in the dtype of its input."""
    n_tokens = hidden.shape[0]
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    # fp32 accumulator across chunks: 32 bf16 partial sums would lose ~5 bits of dW.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    grad_logp = grad_logp.float().contiguous()
    for c0 in range(0, n_tokens, chunk_size):
        c1 = min(c0 + chunk_size, n_tokens)
        h = hidden[c0:c1]
        logits = h @ weight.t()  # recomputed: bitwise the forward's chunk (same GEMM, same shape)
        dlogits = token_logprobs_backward(
            logits, targets[c0:c1], lse[c0:c1], None, grad_logp[c0:c1], None, vocab_start, inplace=True
        )
        if grad_hidden is not None:
            torch.mm(dlogits, weight, out=grad_hidden[c0:c1])
        if grad_weight is not None:
            grad_weight += _mm_fp32(dlogits.t(), h)
        del logits, dlogits
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, tp_group, chunk_size, tp_sum_grad_hidden):
        logp, lse = linear_token_logprobs_forward(hidden, weight, targets, vocab_start, tp_group, chunk_size)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.vocab_start = vocab_start
        ctx.tp_group = tp_group
        ctx.chunk_size = chunk_size
        ctx.tp_sum_grad_hidden = tp_sum_grad_hidden
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden, grad_weight = linear_token_logprobs_backward(
            hidden, weight, targets, lse, grad_logp, ctx.vocab_start, ctx.chunk_size,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )  # fmt: skip
        if grad_hidden is not None and ctx.tp_group is not None and ctx.tp_sum_grad_hidden:
            import torch.distributed as dist

            dist.all_reduce(grad_hidden, group=ctx.tp_group)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int = 0,
    tp_group=None,
    chunk_size: int | None = None,
    tp_sum_grad_hidden: bool = True,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[t, targets[t]] as fp32 [T], differentiable in hidden and weight.

    ``hidden`` [T, H] and ``weight`` [V_local, H] share a dtype; with ``tp_group`` this rank holds
    vocab rows [vocab_start, vocab_start + V_local) of the LM head. ``chunk_size`` tokens per chunk
    (default: see ``default_chunk_size``).
    """
    assert hidden.dim() == 2 and weight.dim() == 2, "hidden [T, H], weight [V_local, H]"
    assert hidden.shape[1] == weight.shape[1], "hidden and weight must share H"
    assert hidden.dtype == weight.dtype, "hidden and weight must share a dtype"
    assert targets.shape == (hidden.shape[0],), "targets must be [T]"
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0])
    return LinearTokenLogprobsFunction.apply(
        hidden.contiguous(), weight.contiguous(), targets.contiguous(), vocab_start, tp_group,
        int(chunk_size), tp_sum_grad_hidden,
    )  # fmt: skip
