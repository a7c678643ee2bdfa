"""Uni-OPD token advantages over a packed batch: rewards, sequence returns, group margin shift.

Same semantics as ``uniopd_mcore.recipe.uniopd_advantages`` (DESIGN.md section 1, steps 1, 2, 4,
5), for ``calibration`` in {"shift", "none"}. Four small launches, no float atomics, so the result
is bitwise the same run to run:

1. one program per sequence reads ``cu_seqlens[b], cu_seqlens[b+1]`` and forms the masked reward
   sum (float64) and count -> return G_b;
2. one program per group scans the N returns (N is a few thousand) for that group's correct /
   incorrect sums, counts (float64), min and max;
   (with ``dp_group``: one SUM all-reduce of sums/counts and one MIN all-reduce of (min, -max))
3. one program over all groups turns the statistics into the group shift s = margin - gap (0 for
   consistent or unmixed groups) and the three diagnostics;
4. one program per sequence picks its share of s by ``direction`` and writes the token advantages
   (r_t + shift) * train_mask and the token mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .utils import token_block

TEACHER_SENTINEL = -100.0
_STATISTICS = ("mean", "minmax")
_DIRECTIONS = {"both": (0.5, -0.5), "correct_up": (1.0, 0.0), "incorrect_down": (0.0, -1.0)}
_CALIBRATIONS = ("shift", "none", "greedy_mask")


class AdvantageOutput(NamedTuple):
    advantages: torch.Tensor  # [T] fp32: (r_t + shift_i) on train tokens, 0 elsewhere
    token_mask: torch.Tensor  # [T] bool: loss_mask & teacher != -100
    returns: torch.Tensor  # [N] fp32: G_i before calibration
    shifts: torch.Tensor  # [N] fp32: what was added to every token advantage of sequence i
    sequence_mask: torch.Tensor  # [N] bool: all True (no greedy masking on this path)
    groups_checked: int  # mixed groups (both classes present)
    groups_violated: int  # mixed groups with gap < margin
    mean_shift: float  # mean |s| over violated groups (0 if none)


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _sequence_returns_kernel(
    student_ptr,
    teacher_ptr,
    loss_mask_ptr,
    cu_seqlens_ptr,
    returns_ptr,  # [N] fp32
    returns64_ptr,  # [N] fp64, what the group statistics sum
    SENTINEL: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    seq = tl.program_id(0)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    # float64 accumulation: a 16K-token fp32 sum loses ~3 digits, and the recipe sums in float64.
    total = tl.zeros([BLOCK_T], dtype=tl.float64)
    count = tl.zeros([BLOCK_T], dtype=tl.int32)
    for t0 in range(start, end, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        inb = offs < end
        lm = tl.load(loss_mask_ptr + offs, mask=inb, other=0) != 0
        s = tl.load(student_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        t = tl.load(teacher_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        # Sentinel tokens have r = 0 but stay in the denominator (the loss mask still counts them).
        r = tl.where(t == SENTINEL, 0.0, t - s)
        total += tl.where(lm, r, 0.0).to(tl.float64)
        count += lm.to(tl.int32)
    n = tl.sum(count, axis=0)
    g = tl.where(n > 0, tl.sum(total, axis=0) / tl.maximum(n, 1).to(tl.float64), 0.0)
    tl.store(returns64_ptr + seq, g)
    tl.store(returns_ptr + seq, g.to(tl.float32))


@triton.jit
def _group_stats_kernel(
    group_ids_ptr,
    correct_ptr,
    returns64_ptr,
    n_seq,
    stats_ptr,  # [NG, 4] fp64 (sum_correct, sum_incorrect, n_correct, n_incorrect)
    extrema_ptr,  # [NG, 2] fp64 (min_correct, -max_incorrect): both reduce with MIN across DP
    BLOCK_N: tl.constexpr,
):
    grp = tl.program_id(0)
    sum_c = tl.zeros([BLOCK_N], dtype=tl.float64)
    sum_i = tl.zeros([BLOCK_N], dtype=tl.float64)
    n_c = tl.zeros([BLOCK_N], dtype=tl.float64)
    n_i = tl.zeros([BLOCK_N], dtype=tl.float64)
    min_c = tl.full([BLOCK_N], float("inf"), tl.float64)
    neg_max_i = tl.full([BLOCK_N], float("inf"), tl.float64)
    # Each group scans every return: N * NG compares (16M at 4K x 4K), but no sort, no atomics and
    # a fixed summation order per group.
    for n0 in range(0, n_seq, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        inb = offs < n_seq
        mine = inb & (tl.load(group_ids_ptr + offs, mask=inb, other=-1) == grp)
        ok = tl.load(correct_ptr + offs, mask=inb, other=0) != 0
        g = tl.load(returns64_ptr + offs, mask=inb, other=0.0)
        is_c = mine & ok
        is_i = mine & (ok == 0)
        sum_c += tl.where(is_c, g, 0.0)
        sum_i += tl.where(is_i, g, 0.0)
        n_c += tl.where(is_c, 1.0, 0.0)
        n_i += tl.where(is_i, 1.0, 0.0)
        min_c = tl.minimum(min_c, tl.where(is_c, g, float("inf")))
        neg_max_i = tl.minimum(neg_max_i, tl.where(is_i, -g, float("inf")))
    out = stats_ptr + grp.to(tl.int64) * 4
    tl.store(out + 0, tl.sum(sum_c, axis=0))
    tl.store(out + 1, tl.sum(sum_i, axis=0))
    tl.store(out + 2, tl.sum(n_c, axis=0))
    tl.store(out + 3, tl.sum(n_i, axis=0))
    ext = extrema_ptr + grp.to(tl.int64) * 2
    tl.store(ext + 0, tl.min(min_c, axis=0))
    tl.store(ext + 1, tl.min(neg_max_i, axis=0))


@triton.jit
def _group_shift_kernel(
    stats_ptr,
    extrema_ptr,
    n_groups,
    margin_ptr,  # [1] fp64: a Python float argument would be passed as fp32 (0.4 -> 0.4000000059)
    group_shift_ptr,  # [NG] fp64: s = margin - gap for violated groups, else 0
    summary_ptr,  # [3] fp64: groups_checked, groups_violated, sum |s| over violated groups
    MINMAX: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    margin = tl.load(margin_ptr)
    checked = tl.zeros([BLOCK_G], dtype=tl.float64)
    violated = tl.zeros([BLOCK_G], dtype=tl.float64)
    abs_shift = tl.zeros([BLOCK_G], dtype=tl.float64)
    for g0 in range(0, n_groups, BLOCK_G):
        offs = g0 + tl.arange(0, BLOCK_G)
        inb = offs < n_groups
        n_c = tl.load(stats_ptr + offs * 4 + 2, mask=inb, other=0.0)
        n_i = tl.load(stats_ptr + offs * 4 + 3, mask=inb, other=0.0)
        mixed = (n_c > 0) & (n_i > 0)
        if MINMAX:
            hi = tl.load(extrema_ptr + offs * 2 + 0, mask=inb, other=0.0)
            lo = -tl.load(extrema_ptr + offs * 2 + 1, mask=inb, other=0.0)
        else:
            hi = tl.load(stats_ptr + offs * 4 + 0, mask=inb, other=0.0) / tl.maximum(n_c, 1.0)
            lo = tl.load(stats_ptr + offs * 4 + 1, mask=inb, other=0.0) / tl.maximum(n_i, 1.0)
        # Unmixed groups may hold +-inf extrema: select before subtracting so no inf - inf.
        gap = tl.where(mixed, hi, 0.0) - tl.where(mixed, lo, 0.0)
        bad = mixed & (gap < margin)
        s = tl.where(bad, margin - gap, 0.0)
        tl.store(group_shift_ptr + offs, s, mask=inb)
        checked += tl.where(mixed, 1.0, 0.0)
        violated += tl.where(bad, 1.0, 0.0)
        abs_shift += tl.abs(s)
    tl.store(summary_ptr + 0, tl.sum(checked, axis=0))
    tl.store(summary_ptr + 1, tl.sum(violated, axis=0))
    tl.store(summary_ptr + 2, tl.sum(abs_shift, axis=0))


@triton.jit
def _apply_shift_kernel(
    student_ptr,
    teacher_ptr,
    loss_mask_ptr,
    cu_seqlens_ptr,
    group_ids_ptr,
    correct_ptr,
    group_shift_ptr,
    coef_correct,
    coef_incorrect,
    shifts_ptr,  # [N] fp32
    adv_ptr,  # [T] fp32
    token_mask_ptr,  # [T] bool
    SENTINEL: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    seq = tl.program_id(0)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    s = tl.load(group_shift_ptr + tl.load(group_ids_ptr + seq))
    ok = tl.load(correct_ptr + seq) != 0
    shift = (s * tl.where(ok, coef_correct, coef_incorrect)).to(tl.float32)
    tl.store(shifts_ptr + seq, shift)
    for t0 in range(start, end, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        inb = offs < end
        lm = tl.load(loss_mask_ptr + offs, mask=inb, other=0) != 0
        st = tl.load(student_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        t = tl.load(teacher_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        keep = lm & (t != SENTINEL)
        tl.store(adv_ptr + offs, tl.where(keep, (t - st) + shift, 0.0), mask=inb)
        tl.store(token_mask_ptr + offs, keep, mask=inb)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------


def _as_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 byte view of a mask of any dtype (bool reinterprets for free)."""
    mask = mask if mask.dtype == torch.bool else mask != 0
    return mask.contiguous().view(torch.uint8)


def _num_groups(group_ids: torch.Tensor, dp_group) -> int:
    """max(group_id) + 1 over the DP group: the dense index space the statistics live in.

    One host sync (the statistics tensors are sized by it)."""
    top = group_ids.max().reshape(1).long() if group_ids.numel() else group_ids.new_full((1,), -1).long()
    if dp_group is not None:
        import torch.distributed as dist

        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=dp_group)
    return int(top.item()) + 1


def sequence_returns(student, teacher, loss_mask_u8, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel 1 -> (returns fp32 [N], returns fp64 [N])."""
    n_seq = cu_seqlens.numel() - 1
    returns = torch.empty(n_seq, dtype=torch.float32, device=student.device)
    returns64 = torch.empty(n_seq, dtype=torch.float64, device=student.device)
    if n_seq > 0:
        _sequence_returns_kernel[(n_seq,)](
            student, teacher, loss_mask_u8, cu_seqlens, returns, returns64,
            SENTINEL=TEACHER_SENTINEL, BLOCK_T=token_block(triton.cdiv(student.numel(), n_seq)),
        )  # fmt: skip
    return returns, returns64


def group_statistics(group_ids, correct_u8, returns64, n_groups: int, dp_group=None):
    """Kernel 2 (+ the DP all-reduces) -> (stats [NG, 4] fp64, extrema [NG, 2] fp64)."""
    device = returns64.device
    stats = torch.zeros((n_groups, 4), dtype=torch.float64, device=device)
    extrema = torch.full((n_groups, 2), float("inf"), dtype=torch.float64, device=device)
    n_seq = returns64.numel()
    if n_groups > 0 and n_seq > 0:
        _group_stats_kernel[(n_groups,)](
            group_ids, correct_u8, returns64, n_seq, stats, extrema, BLOCK_N=token_block(n_seq)
        )
    if dp_group is not None and n_groups > 0:
        import torch.distributed as dist

        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=dp_group)
        dist.all_reduce(extrema, op=dist.ReduceOp.MIN, group=dp_group)
    return stats, extrema


def group_shifts(stats, extrema, margin: float, statistic: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel 3 -> (group shift [NG] fp64, summary [3] fp64)."""
    n_groups = stats.shape[0]
    shift = torch.empty(n_groups, dtype=torch.float64, device=stats.device)
    summary = torch.zeros(3, dtype=torch.float64, device=stats.device)
    if n_groups > 0:
        _group_shift_kernel[(1,)](
            stats, extrema, n_groups, torch.full((1,), float(margin), dtype=torch.float64, device=stats.device),
            shift, summary,
            MINMAX=statistic == "minmax", BLOCK_G=max(16, min(triton.next_power_of_2(n_groups), 1024)),
        )  # fmt: skip
    return shift, summary


def apply_shifts(student, teacher, loss_mask_u8, cu_seqlens, group_ids, correct_u8, group_shift, coefs):
    """Kernel 4 -> (advantages fp32 [T], token_mask bool [T], shifts fp32 [N])."""
    n_tok, n_seq = student.numel(), cu_seqlens.numel() - 1
    device = student.device
    # zeros, not empty: tokens outside every sequence (a malformed cu_seqlens) stay 0, not garbage.
    adv = torch.zeros(n_tok, dtype=torch.float32, device=device)
    token_mask = torch.zeros(n_tok, dtype=torch.bool, device=device)
    shifts = torch.empty(n_seq, dtype=torch.float32, device=device)
    if n_seq > 0:
        _apply_shift_kernel[(n_seq,)](
            student, teacher, loss_mask_u8, cu_seqlens, group_ids, correct_u8, group_shift,
            float(coefs[0]), float(coefs[1]), shifts, adv, token_mask,
            SENTINEL=TEACHER_SENTINEL, BLOCK_T=token_block(triton.cdiv(n_tok, n_seq)),
        )  # fmt: skip
    return adv, token_mask, shifts


# ------------------------------------------------------------------------------------------------
# entry point (no autograd: advantages are constants of the loss)
# ------------------------------------------------------------------------------------------------


def uniopd_advantages(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    group_ids: torch.Tensor,
    correct: torch.Tensor,
    *,
    margin: float = 0.4,
    statistic: str = "mean",
    direction: str = "both",
    calibration: str = "shift",
    min_retain_ratio: float = 0.25,
    dp_group=None,
) -> AdvantageOutput:
    """Token advantages of the Uni-OPD recipe; see the module docstring.

    ``calibration="greedy_mask"`` is sequential by nature (drop the worst sequence, re-check) and
    is not implemented here: it raises NotImplementedError; use the recipe's torch backend.
    ``min_retain_ratio`` only matters for greedy_mask and is accepted for signature parity.
    """
    if statistic not in _STATISTICS:
        raise ValueError(f"statistic must be one of {_STATISTICS}, got {statistic!r}")
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {tuple(_DIRECTIONS)}, got {direction!r}")
    if calibration not in _CALIBRATIONS:
        raise ValueError(f"calibration must be one of {_CALIBRATIONS}, got {calibration!r}")
    if calibration == "greedy_mask":
        raise NotImplementedError("greedy_mask: use backend='torch'")
    student = student_logprobs.detach().reshape(-1).contiguous()
    teacher = teacher_logprobs.detach().reshape(-1).contiguous()
    assert teacher.numel() == student.numel() == loss_mask.numel(), "per-token inputs must all be [T]"
    loss_mask_u8 = _as_bytes(loss_mask.reshape(-1))
    cu_seqlens = cu_seqlens.contiguous()
    group_ids = group_ids.contiguous()
    correct_u8 = _as_bytes(correct)
    n_seq = cu_seqlens.numel() - 1
    assert group_ids.numel() == n_seq and correct.numel() == n_seq, "per-sequence inputs must be [N]"

    returns, returns64 = sequence_returns(student, teacher, loss_mask_u8, cu_seqlens)
    n_groups = _num_groups(group_ids, dp_group)
    if dp_group is None and n_groups > 4 * n_seq + 1024:
        # Sparse ids (not the prompt index of the step): compact them so that kernel 2 does not
        # launch one program per unused id. Across DP ranks the dense id space is the contract.
        group_ids = torch.unique(group_ids, return_inverse=True)[1].contiguous()
        n_groups = int(group_ids.max()) + 1
    stats, extrema = group_statistics(group_ids, correct_u8, returns64, n_groups, dp_group)
    group_shift, summary = group_shifts(stats, extrema, margin, statistic)
    coefs = _DIRECTIONS[direction] if calibration == "shift" else (0.0, 0.0)
    adv, token_mask, shifts = apply_shifts(
        student, teacher, loss_mask_u8, cu_seqlens, group_ids, correct_u8, group_shift, coefs
    )
    checked, violated, abs_sum = summary.tolist()  # the second (and last) host sync
    return AdvantageOutput(
        advantages=adv,
        token_mask=token_mask,
        returns=returns,
        shifts=shifts,
        sequence_mask=torch.ones(n_seq, dtype=torch.bool, device=student.device),
        groups_checked=int(checked),
        groups_violated=int(violated),
        # As in the recipe: the mean shift actually applied, so 0 when calibration is "none".
        mean_shift=abs_sum / violated if violated > 0 and calibration == "shift" else 0.0,
    )
