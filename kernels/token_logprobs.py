"""Per-token log-probabilities (and entropy) of the target token from logits, vocab-parallel.

``token_logprobs(logits [T, V_local], targets [T])`` returns log softmax(logits)[t, targets[t]] in
float32, optionally the entropy of every row, and is differentiable with respect to the logits.

Forward: one program per row streams the vocabulary in blocks and keeps an online (max, sum-exp)
pair in float32 (bf16 has 8 mantissa bits: summing 151,936 exponentials in it loses the tail). Only
the log-sum-exp (and the entropy, when asked) is saved, T floats, so the backward recomputes the
softmax block by block instead of storing a [T, V] probability matrix.

Vocab-parallel (``tp_group``): rank r holds columns [vocab_start, vocab_start + V_local). Each rank
computes the per-row statistics of its shard, (max, sum-exp, target logit, entropy accumulator); one
all-gather of those T x 4 floats merges them (TE style), so the only collective is O(T) and the
logits shard is read once. A target outside the shard gives a -inf local target logit, which the
max-merge ignores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import all_gather_rows
from .utils import last_dim_contiguous
from .utils import row_offset
from .utils import vocab_block

# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    stats_ptr,  # [T, 4] fp32 (m, d, x_y, a) when WRITE_STATS
    logp_ptr,  # [T] fp32, when not WRITE_STATS
    lse_ptr,  # [T] fp32, when not WRITE_STATS
    ent_ptr,  # [T] fp32, when not WRITE_STATS and WITH_ENTROPY
    n_cols,
    vocab_start,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WRITE_STATS: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row_offset(row, stride_row)
    offs = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    # Running statistics relative to the running max m: d = sum e^(x-m), a = sum e^(x-m) (x-m).
    # Keeping a relative to m (not sum e^(x-m) x) avoids cancelling two ~1e4 numbers for entropy.
    m = tl.full((), neg_inf, tl.float32)
    d = tl.full((), 0.0, tl.float32)
    a = tl.full((), 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        # Columns past the shard end are -inf so they drop out of the max and of every sum.
        x = tl.load(base + cols, mask=cols < n_cols, other=neg_inf).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # Guards keep -inf - -inf and 0 * -inf (nan) out: m_new is -inf only while every value
        # seen is -inf, and d == 0 exactly then.
        scale = tl.where(m_new > neg_inf, tl.exp(m - m_new), 0.0)
        valid = x > neg_inf
        xm = tl.where(valid, x - m_new, 0.0)
        e = tl.where(valid, tl.exp(xm), 0.0)
        if WITH_ENTROPY:
            # Rebase a on the new max: e^(x-m_old)(x-m_old) -> scale * e^(x-m_old) (x-m_old + m_old-m_new).
            a = scale * (a + d * tl.where(d > 0, m - m_new, 0.0)) + tl.sum(e * xm, axis=0)
        d = d * scale + tl.sum(e, axis=0)
        m = m_new

    # The target logit, if this rank owns the target column (vocab-parallel), else -inf.
    local_y = tl.load(targets_ptr + row).to(tl.int64) - vocab_start
    owned = (local_y >= 0) & (local_y < n_cols)
    x_y = tl.load(base + local_y, mask=owned, other=neg_inf).to(tl.float32)

    if WRITE_STATS:
        out = stats_ptr + row.to(tl.int64) * 4
        tl.store(out + 0, m)
        tl.store(out + 1, d)
        tl.store(out + 2, x_y)
        tl.store(out + 3, a)
    else:
        log_d = tl.log(d)
        lse = m + log_d
        tl.store(logp_ptr + row, x_y - lse)
        tl.store(lse_ptr + row, lse)
        if WITH_ENTROPY:
            tl.store(ent_ptr + row, log_d - a / d)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,
    stride_row,
    dlogits_ptr,  # may alias logits_ptr (inplace_backward): each element is read before written
    stride_grow,
    targets_ptr,
    lse_ptr,
    ent_ptr,
    g_logp_ptr,
    g_ent_ptr,
    n_cols,
    vocab_start,
    BLOCK_V: tl.constexpr,
    HAS_G_LOGP: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
):
    # 2-D grid (row, vocab block): no loop, and T * V / BLOCK_V programs keep every SM busy.
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < n_cols
    x = tl.load(logits_ptr + row_offset(row, stride_row) + cols, mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    lse = tl.load(lse_ptr + row)
    # Masked / -inf columns: p = 0 and log p = 0 (not -inf) so that 0 * log p stays 0.
    p = tl.exp(x - lse)
    logp = tl.where(p > 0, x - lse, 0.0)
    grad = tl.zeros([BLOCK_V], dtype=tl.float32)
    if HAS_G_LOGP:
        # d log p_y / d x_j = [j == y] - p_j, with the upstream grad folded in before the store so
        # the target element is formed once in fp32 (no "1 - p" on an already rounded bf16 value).
        g = tl.load(g_logp_ptr + row)
        local_y = tl.load(targets_ptr + row).to(tl.int64) - vocab_start
        grad += g * (tl.where(cols == local_y, 1.0, 0.0) - p)
    if HAS_G_ENT:
        # H = -sum p log p  =>  dH / dx_j = -p_j (log p_j + H).
        g_e = tl.load(g_ent_ptr + row)
        h = tl.load(ent_ptr + row)
        grad += -g_e * p * (logp + h)
    out = dlogits_ptr + row_offset(row, stride_grow) + cols
    tl.store(out, grad.to(dlogits_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------


def merge_row_stats(stats: torch.Tensor, tp_group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge per-shard row statistics [T, 4] across ``tp_group`` -> (x_y, lse, entropy), fp32 [T].

    One all-gather of the (m, d, x_y, a) rows, then the standard pairwise (max, sum-exp) merge done
    for all shards at once in torch: O(world * T) work, negligible next to the logits read.
    """
    if tp_group is not None:
        allst = all_gather_rows(stats, tp_group)  # [W, T, 4]
    else:
        allst = stats.unsqueeze(0)
    m, d, x_y, a = allst.unbind(-1)
    big_m = m.amax(dim=0)
    seen = m > float("-inf")
    rel = torch.where(seen, m - big_m, torch.zeros_like(m))  # 0 where a shard is empty: no nan
    scale = torch.where(seen, torch.exp(rel), torch.zeros_like(m))
    big_d = (scale * d).sum(dim=0)
    big_a = (scale * (a + d * rel)).sum(dim=0)
    log_d = torch.log(big_d)
    return x_y.amax(dim=0), big_m + log_d, log_d - big_a / big_d


def launch_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    stats: torch.Tensor | None,
    logp: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor | None,
) -> None:
    """Forward kernel into preallocated outputs: the [T, 4] ``stats`` when given (vocab-parallel,
    merged later), else ``logp``/``lse``/``ent`` directly. Outputs may be row slices of bigger
    buffers (the fused-linear path fills them chunk by chunk)."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block, num_warps = vocab_block(n_cols)
    _token_logprobs_fwd_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        targets,
        stats if stats is not None else logp,
        logp,
        lse,
        ent if ent is not None else logp,
        n_cols,
        vocab_start,
        BLOCK_V=block,
        WITH_ENTROPY=ent is not None,
        WRITE_STATS=stats is not None,
        num_warps=num_warps,
    )


def token_logprobs_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int = 0,
    tp_group=None,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel (and the TP merge) -> (logp, lse, entropy or None), fp32 [T]."""
    assert logits.dim() == 2, "logits must be [T, V_local]"
    n_rows = logits.shape[0]
    assert targets.shape == (n_rows,), "targets must be [T]"
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if return_entropy else None
    if tp_group is None:
        launch_forward(logits, targets, vocab_start, None, logp, lse, ent)
        return logp, lse, ent
    stats = torch.empty((n_rows, 4), dtype=torch.float32, device=logits.device)
    launch_forward(logits, targets, vocab_start, stats, logp, lse, ent)
    x_y, lse, h = merge_row_stats(stats, tp_group)
    return x_y - lse, lse, h if return_entropy else None


def token_logprobs_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_ent: torch.Tensor | None,
    vocab_start: int = 0,
    inplace: bool = False,
) -> torch.Tensor:
    """Launch the backward kernel -> dlogits (dtype of logits; the logits buffer when ``inplace``)."""
    n_rows, n_cols = logits.shape
    dlogits = logits if inplace else torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows == 0 or n_cols == 0:
        return dlogits
    if grad_logp is None and grad_ent is None:
        return dlogits.zero_()
    block, num_warps = vocab_block(n_cols)
    _token_logprobs_bwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
        logits,
        logits.stride(0),
        dlogits,
        dlogits.stride(0),
        targets,
        lse,
        ent if ent is not None else lse,
        grad_logp.float().contiguous() if grad_logp is not None else lse,
        grad_ent.float().contiguous() if grad_ent is not None else lse,
        n_cols,
        vocab_start,
        BLOCK_V=block,
        HAS_G_LOGP=grad_logp is not None,
        HAS_G_ENT=grad_ent is not None,
        num_warps=num_warps,
    )
    return dlogits


# ------------------------------------------------------------------------------------------------
# plain-torch reference (same signature; fp32 log_softmax + gather; vocab-parallel via all-reduces)
# ------------------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over the TP group forward; identity backward (every rank holds the same downstream loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def token_logprobs_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int = 0,
    tp_group=None,
    inplace_backward: bool = False,  # accepted for signature parity; autograd owns the buffers here
    return_entropy: bool = False,
):
    """Reference: log_softmax in (at least) fp32 and a gather; three all-reduces when vocab-parallel."""
    import torch.distributed as dist

    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    n_rows, n_cols = x.shape
    local_y = targets.long() - vocab_start
    owned = (local_y >= 0) & (local_y < n_cols)
    if n_cols > 0:
        m = x.detach().amax(dim=1)
        x_y = x.gather(1, local_y.clamp(0, n_cols - 1).unsqueeze(1)).squeeze(1)
    else:
        m = torch.full((n_rows,), float("-inf"), dtype=x.dtype, device=x.device)
        x_y = torch.zeros(n_rows, dtype=x.dtype, device=x.device)
    x_y = torch.where(owned, x_y, torch.zeros_like(x_y))
    if tp_group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # the max only shifts; never differentiated
    e = torch.exp(x - m.unsqueeze(1))
    d = e.sum(dim=1)
    if tp_group is not None:
        d = _AllReduceSum.apply(d, tp_group)
        x_y = _AllReduceSum.apply(x_y, tp_group)
    lse = m + torch.log(d)
    logp = (x_y - lse).float()
    if not return_entropy:
        return logp
    # H = log d - sum e (x - m) / d. The shard sum must depend on the local logits only (m is a
    # constant): with the identity-backward all-reduce, a term like p = e / d_global summed per
    # shard would send each rank only its own part of dH/dd.
    ex = torch.where(e > 0, e * (x - m.unsqueeze(1)), torch.zeros_like(e)).sum(dim=1)
    if tp_group is not None:
        ex = _AllReduceSum.apply(ex, tp_group)
    return logp, (torch.log(d) - ex / d).float()


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, tp_group, inplace_backward, return_entropy):
        logp, lse, ent = token_logprobs_forward(logits, targets, vocab_start, tp_group, return_entropy)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.vocab_start = vocab_start
        ctx.inplace_backward = inplace_backward
        ctx.set_materialize_grads(False)
        if ent is None:
            return logp
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        logits, targets, lse, ent = ctx.saved_tensors
        dlogits = None
        if ctx.needs_input_grad[0]:
            dlogits = token_logprobs_backward(
                logits, targets, lse, ent, grad_logp, grad_ent, ctx.vocab_start, ctx.inplace_backward
            )
        return dlogits, None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int = 0,
    tp_group=None,
    inplace_backward: bool = False,
    return_entropy: bool = False,
):
    """log softmax(logits)[t, targets[t]] as fp32 [T] (and the row entropies [T] when asked).

    ``logits`` [T, V_local] in bf16/fp16/fp32 with any row stride; ``targets`` [T] global vocab ids
    in [0, V). With ``tp_group`` the vocabulary is sharded over the group and this rank holds
    columns [vocab_start, vocab_start + V_local). ``inplace_backward`` writes the logits gradient
    into the logits buffer (saves a [T, V_local] allocation; only safe when nothing else needs
    those logits after this op's backward, e.g. the output of a plain matmul, and when the graph
    is walked backward once). A target no rank owns (e.g. an ignore index of -100) gives -inf.
    """
    logits = last_dim_contiguous(logits)
    targets = targets.contiguous()
    return TokenLogprobsFunction.apply(logits, targets, vocab_start, tp_group, inplace_backward, return_entropy)
