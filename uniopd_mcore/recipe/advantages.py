"""Uni-OPD token advantages: DESIGN.md section 1, steps 1, 2, 4 and 5, over a packed token stream.

Everything is vectorised: per-sequence values come from segment sums over the packed stream, and
per-group values from segment reductions over a dense group index, so there is no Python loop
over sequences or groups. Token math runs in float32; per-sequence and per-group sums run in
float64 (fixed summation order, see ``segments.py``) and are cast back, so results are
reproducible from run to run.

Pipeline (step numbers of DESIGN.md section 1):

1. token reward ``r_t = teacher - student`` (0 on sentinel -100 tokens);
2. sequence return ``G_i`` = mean of ``r_t`` over the loss tokens of sequence i;
4. order consistency per mixed group: ``gap = stat(G_correct) - stat(G_incorrect)``;
5. margin shift ``s = margin - gap`` split by ``direction``, or the greedy mask.

Steps 3 (verifier), 6 (online balancing, ``balancing.py``), 7 (offline balancing) and 8 (loss,
``loss.py``) live elsewhere.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from dataclasses import fields

import torch
import torch.distributed as dist
from torch import Tensor

from .segments import dense_group_index
from .segments import grouped_reduce
from .segments import lexsort
from .segments import rank_within_segments
from .segments import segment_reduce
from .segments import sequence_ids
from .segments import sequence_sum

TEACHER_SENTINEL = -100.0
STATISTICS = ("mean", "minmax")
DIRECTIONS = ("both", "correct_up", "incorrect_down")
CALIBRATIONS = ("shift", "greedy_mask", "none")
BACKENDS = ("torch", "triton", "auto")

# Step 5: multiplier of the group shift s for (correct, incorrect) sequences. Each pair differs by
# exactly 1, which is why the calibrated gap equals the margin for every direction.
_DIRECTION_COEF = {"both": (0.5, -0.5), "correct_up": (1.0, 0.0), "incorrect_down": (0.0, -1.0)}

# A greedy removal "raises the gap" only by more than this. Sums of the same numbers in another
# order differ in the last bits; the tolerance keeps such near ties from being decided differently
# by different (but equally correct) implementations, e.g. the Triton kernel or a test reference.
GREEDY_TIE_EPS = 1e-9


@dataclass
class AdvantageResult:
    """Output of :func:`uniopd_advantages` (field names are shared with the Triton kernel)."""

    advantages: Tensor  # [T] float32; (r_t + shift_i) on train tokens, 0 elsewhere
    token_mask: Tensor  # [T] bool; loss_mask & teacher != -100 & sequence kept
    returns: Tensor  # [N] float32, G_i before calibration
    shifts: Tensor  # [N] float32, what was added to every token advantage of sequence i
    sequence_mask: Tensor  # [N] bool, False for sequences dropped by greedy_mask
    groups_checked: int  # mixed groups (both classes present)
    groups_violated: int  # mixed groups with gap < margin
    mean_shift: float  # mean |s| over violated groups (0 if none)


def uniopd_advantages(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    group_ids: Tensor,
    correct: Tensor,
    *,
    margin: float = 0.4,
    statistic: str = "mean",
    direction: str = "both",
    calibration: str = "shift",
    min_retain_ratio: float = 0.25,
    dp_group: dist.ProcessGroup | None = None,
    backend: str = "torch",
) -> AdvantageResult:
    """Token advantages of Uni-OPD with outcome-guided margin calibration (DESIGN.md 1, steps 1-5).

    Args:
        student_logprobs: [T] log-probs of the sampled tokens under the rollout-time student
            (``logp_student_old``), aligned with ``input_ids``.
        teacher_logprobs: [T] teacher log-probs of the same tokens; -100 marks a failed token.
        loss_mask: [T] 1 on response tokens that train.
        cu_seqlens: [N+1] integer offsets of the N sequences (leading 0, last = T).
        group_ids: [N] non-negative prompt index of each sequence (consistent across DP ranks).
        correct: [N] bool verifier outcome (step 3).
        margin: delta of step 4 (0.4 in the released recipe).
        statistic: "mean" (released) or "minmax" (the paper's m(q)).
        direction: "both" (released), "correct_up" or "incorrect_down".
        calibration: "shift" (step 5), "greedy_mask" (its alternative) or "none".
        min_retain_ratio: greedy_mask keeps at least max(1, ceil(ratio * class size)) per class.
        dp_group: data-parallel group when the sequences of a group are spread over ranks; the
            group statistics then equal those of one rank holding the union.
        backend: "torch" (this reference), "triton" (``uniopd_kernels``) or "auto" (triton when
            CUDA is available, else torch).
    """
    _check_choice("statistic", statistic, STATISTICS)
    _check_choice("direction", direction, DIRECTIONS)
    _check_choice("calibration", calibration, CALIBRATIONS)
    _check_choice("backend", backend, BACKENDS)
    _validate(student_logprobs, teacher_logprobs, loss_mask, cu_seqlens, group_ids, correct, margin, min_retain_ratio)
    if dp_group is not None and not dist.is_initialized():
        raise RuntimeError("dp_group was given but torch.distributed is not initialized")
    if backend == "auto":
        backend = "triton" if torch.cuda.is_available() else "torch"
    if backend == "triton":
        return _triton_advantages(
            student_logprobs, teacher_logprobs, loss_mask, cu_seqlens, group_ids, correct,
            margin=margin, statistic=statistic, direction=direction, calibration=calibration,
            min_retain_ratio=min_retain_ratio, dp_group=dp_group,
        )  # fmt: skip

    num_tokens = student_logprobs.numel()
    num_seqs = cu_seqlens.numel() - 1
    device = student_logprobs.device
    correct = correct.bool()

    # Step 1: token reward on the sampled token; the sentinel means "teacher failed": r_t = 0.
    teacher = teacher_logprobs.float()
    sentinel = teacher == TEACHER_SENTINEL
    reward = torch.where(sentinel, 0.0, teacher - student_logprobs.float())

    # Step 2: G_i = mean of r_t over loss tokens; sentinel tokens count in the denominator with
    # r_t = 0, and a sequence with no loss token has G_i = 0.
    train = loss_mask != 0
    count = sequence_sum(train, cu_seqlens)
    total = sequence_sum(torch.where(train, reward, 0.0), cu_seqlens)
    returns64 = torch.where(count > 0, total / count.clamp(min=1.0), 0.0)

    shifts64 = torch.zeros(num_seqs, dtype=torch.float64, device=device)
    keep = torch.ones(num_seqs, dtype=torch.bool, device=device)
    mean_shift = 0.0
    if calibration == "greedy_mask":
        keep, checked, violated = _greedy_mask(
            returns64, group_ids, correct, statistic, margin, min_retain_ratio, dp_group
        )
    else:
        gidx, num_groups = _group_index(group_ids, dp_group)
        mixed, gap = _group_gap(returns64, gidx, correct, num_groups, statistic, dp_group)
        # Step 4: only groups with both classes are checked; gap >= margin is consistent.
        violated_g = mixed & (gap < margin)
        checked, violated = int(mixed.sum()), int(violated_g.sum())
        if calibration == "shift" and violated:
            # Step 5: s = margin - gap, added to every token of the group's sequences by direction.
            s = torch.where(violated_g, margin - gap, 0.0)
            up, down = _DIRECTION_COEF[direction]
            shifts64 = s[gidx] * torch.where(correct, up, down).double()
            mean_shift = float(s[violated_g].abs().mean())

    # A_t = r_t + shift_i on train tokens (loss mask, teacher ok, sequence kept), 0 elsewhere.
    seq = sequence_ids(cu_seqlens, num_tokens)
    shifts = shifts64.float()
    token_mask = train & ~sentinel & keep[seq]
    advantages = torch.where(token_mask, reward + shifts[seq], 0.0)
    return AdvantageResult(
        advantages=advantages,
        token_mask=token_mask,
        returns=returns64.float(),
        shifts=shifts,
        sequence_mask=keep,
        groups_checked=checked,
        groups_violated=violated,
        mean_shift=mean_shift,
    )


# ---------------------------------------------------------------------------------------------
# Step 4: group statistics (all-reduced over data-parallel ranks)


def _group_index(group_ids: Tensor, dp_group: dist.ProcessGroup | None) -> tuple[Tensor, int]:
    """Dense group index and number of groups.

    On one rank the ids are compacted. Across ranks every rank must use the same index space, so
    the space is [0, max_group_id + 1) with the max all-reduced first (ids are prompt indices of
    the step, hence small).
    """
    if dp_group is None:
        return dense_group_index(group_ids)
    local_max = group_ids.max().long() if group_ids.numel() else torch.tensor(-1, device=group_ids.device)
    global_max = local_max.reshape(1).clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=dp_group)
    return group_ids.long(), int(global_max.item()) + 1


def _group_gap(
    returns: Tensor,
    gidx: Tensor,
    correct: Tensor,
    num_groups: int,
    statistic: str,
    dp_group: dist.ProcessGroup | None,
) -> tuple[Tensor, Tensor]:
    """Step 4: ``(mixed [K] bool, gap [K] float64)``; gap is +inf for groups that are not mixed.

    Segment 2k holds the correct sequences of group k, segment 2k+1 the incorrect ones. Counts
    and sums are float64 and summed over ranks; mins and maxes are reduced with MIN/MAX, so a
    group split over ranks gets the statistics of the union.
    """
    seg = gidx * 2 + (~correct).long()
    nseg = 2 * num_groups
    ones = torch.ones_like(returns)
    counts_sums = torch.stack(
        [grouped_reduce(ones, seg, nseg, "sum"), grouped_reduce(returns, seg, nseg, "sum")]
    )  # [2, 2K]
    if dp_group is not None:
        dist.all_reduce(counts_sums, op=dist.ReduceOp.SUM, group=dp_group)
    counts, sums = counts_sums.view(2, num_groups, 2).unbind(0)  # [K, 2] each
    mixed = (counts > 0).all(dim=1)
    if statistic == "mean":
        stat = sums / counts.clamp(min=1.0)
        gap = stat[:, 0] - stat[:, 1]
    else:
        lows = grouped_reduce(returns, seg, nseg, "min")
        highs = grouped_reduce(returns, seg, nseg, "max")
        if dp_group is not None:
            dist.all_reduce(lows, op=dist.ReduceOp.MIN, group=dp_group)
            dist.all_reduce(highs, op=dist.ReduceOp.MAX, group=dp_group)
        # min over correct minus max over incorrect.
        gap = lows.view(num_groups, 2)[:, 0] - highs.view(num_groups, 2)[:, 1]
    return mixed, torch.where(mixed, gap, float("inf"))


# ---------------------------------------------------------------------------------------------
# Step 5, alternative: greedy margin mask


def _greedy_mask(
    returns: Tensor,
    group_ids: Tensor,
    correct: Tensor,
    statistic: str,
    margin: float,
    min_retain_ratio: float,
    dp_group: dist.ProcessGroup | None,
) -> tuple[Tensor, int, int]:
    """Greedy mask, also across ranks: ``(keep [N], groups_checked, groups_violated)``.

    Which sequence goes next depends on the whole sorted order of a group, which sum/min/max
    all-reduces cannot express. Each rank therefore all-gathers the per-sequence (group id,
    return, correct) of all ranks (3 numbers a sequence, cheap), runs the same deterministic
    greedy on the identical union (ties broken by position in the union, i.e. rank then local
    index), and keeps the slice of its own sequences. All ranks thus take identical decisions,
    and they equal those of a single rank holding the union in rank order.
    """
    offset = 0
    num_local = returns.numel()
    if dp_group is not None:
        returns, group_ids, correct, offset = _all_gather_sequences(returns, group_ids, correct, dp_group)
    gidx, num_groups = dense_group_index(group_ids)
    keep, checked, violated = _greedy_mask_local(returns, gidx, num_groups, correct, statistic, margin, min_retain_ratio)
    return keep[offset : offset + num_local], checked, violated


def _all_gather_sequences(
    returns: Tensor, group_ids: Tensor, correct: Tensor, dp_group: dist.ProcessGroup
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Union over ranks (in rank order) of (return, group id, correct), plus this rank's offset."""
    world = dist.get_world_size(dp_group)
    rank = dist.get_rank(dp_group)
    device = returns.device
    n_local = torch.tensor([returns.numel()], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(n_local) for _ in range(world)]
    dist.all_gather(sizes, n_local, group=dp_group)
    sizes_list = [int(s.item()) for s in sizes]
    width = max(sizes_list)
    # float64 holds group ids exactly up to 2**53.
    packed = torch.zeros(width, 3, dtype=torch.float64, device=device)
    packed[: returns.numel()] = torch.stack([returns, group_ids.double(), correct.double()], dim=1)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=dp_group)
    union = torch.cat([g[:n] for g, n in zip(gathered, sizes_list)])
    return union[:, 0], union[:, 1].long(), union[:, 2] != 0, sum(sizes_list[:rank])


def _greedy_mask_local(
    returns: Tensor,
    gidx: Tensor,
    num_groups: int,
    correct: Tensor,
    statistic: str,
    margin: float,
    min_retain_ratio: float,
) -> tuple[Tensor, int, int]:
    """Step 5, greedy mask on one rank, vectorised across groups.

    Per mixed group with gap < margin, repeatedly drop either the worst-return correct sequence
    or the best-return incorrect sequence, whichever raises the gap more (a tie goes to the
    correct one, as in the released code), until gap >= margin; stop when neither raises it,
    and never keep fewer than max(1, ceil(min_retain_ratio * class size)) of a class.

    Sorting each class once (correct by return ascending, incorrect descending) turns "drop the
    next one" into a per-class counter ``dropped[k, c]``: the kept sequences are those at rank >=
    dropped in their sorted class. Each loop iteration advances every active group at once, so
    the loop runs at most (max group size) times.
    """
    num_seqs = returns.numel()
    device = returns.device
    if num_seqs == 0:
        return torch.ones(0, dtype=torch.bool, device=device), 0, 0
    nseg = 2 * num_groups
    seg = gidx * 2 + (~correct).long()  # 2k: correct of group k, 2k+1: incorrect
    order = lexsort(seg, torch.where(correct, returns, -returns))
    seg_sorted = seg[order]
    value = returns[order]
    rank = rank_within_segments(seg_sorted, nseg)
    counts = torch.bincount(seg, minlength=nseg).view(num_groups, 2)
    starts = (torch.cumsum(counts.flatten(), 0) - counts.flatten()).view(num_groups, 2)
    mixed = (counts > 0).all(dim=1)
    keep_min = torch.ceil(min_retain_ratio * counts.double()).long().clamp(min=1)

    def gap_after(dropped: Tensor) -> Tensor:
        """Gap [K] when the first ``dropped[k, c]`` sequences of each sorted class are gone."""
        if statistic == "mean":
            kept = rank >= dropped.flatten()[seg_sorted]
            sums = segment_reduce(torch.where(kept, value, 0.0), counts.flatten(), "sum").view(num_groups, 2)
            stat = sums / (counts - dropped).clamp(min=1).double()
        else:
            # The first kept entry is the min of the correct (ascending) / max of the incorrect.
            first = (starts + dropped).clamp(max=num_seqs - 1)
            stat = value[first]
        return stat[:, 0] - stat[:, 1]

    dropped = torch.zeros_like(counts)
    gap = gap_after(dropped)
    violated = mixed & (gap < margin)
    active = violated.clone()
    step_c = torch.tensor([1, 0], device=device)
    step_i = torch.tensor([0, 1], device=device)
    # Every iteration drops one sequence of each active group: at most (group size - 2) rounds.
    for _ in range(int(counts.sum(dim=1).max()) - 2):
        if not bool(active.any()):
            break
        can = active[:, None] & (counts - dropped > keep_min)  # [K, 2]
        gap_c = gap_after(dropped + step_c)
        gap_i = gap_after(dropped + step_i)
        raise_c = can[:, 0] & (gap_c > gap + GREEDY_TIE_EPS)
        raise_i = can[:, 1] & (gap_i > gap + GREEDY_TIE_EPS)
        drop_i = raise_i & (~raise_c | (gap_i > gap_c + GREEDY_TIE_EPS))
        drop_c = raise_c & ~drop_i
        dropped = dropped + torch.stack([drop_c, drop_i], dim=1).long()
        gap = gap_after(dropped)
        # Groups where neither removal raised the gap stop, as do groups that reached the margin.
        active = (drop_c | drop_i) & (gap < margin)

    keep = torch.empty(num_seqs, dtype=torch.bool, device=device)
    keep[order] = rank >= dropped.flatten()[seg_sorted]
    return keep, int(mixed.sum()), int(violated.sum())


# ---------------------------------------------------------------------------------------------
# Backend dispatch and validation


def _triton_advantages(*args, **kwargs) -> AdvantageResult:
    """Run ``uniopd_kernels.uniopd_advantages`` (same arguments minus ``backend``)."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(
            "backend='triton' needs a CUDA device or TRITON_INTERPRET=1 (Triton's CPU interpreter); "
            "use backend='torch' or backend='auto'"
        )
    try:
        import uniopd_kernels
    except ImportError as exc:  # triton itself missing or broken
        raise RuntimeError(f"backend='triton' could not import uniopd_kernels: {exc}") from exc
    kernel = getattr(uniopd_kernels, "uniopd_advantages", None)
    if kernel is None:
        raise RuntimeError("backend='triton': uniopd_kernels has no uniopd_advantages; use backend='torch'")
    out = kernel(*args, **kwargs)
    return AdvantageResult(**{f.name: getattr(out, f.name) for f in fields(AdvantageResult)})


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")


def _is_integer(t: Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def _validate(
    student: Tensor,
    teacher: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    group_ids: Tensor,
    correct: Tensor,
    margin: float,
    min_retain_ratio: float,
) -> None:
    """Shape and value checks with messages that name the offending argument."""
    named = dict(student_logprobs=student, teacher_logprobs=teacher, loss_mask=loss_mask,
                 cu_seqlens=cu_seqlens, group_ids=group_ids, correct=correct)  # fmt: skip
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    num_tokens = student.numel()
    for name in ("teacher_logprobs", "loss_mask"):
        if named[name].numel() != num_tokens:
            raise ValueError(f"{name} has {named[name].numel()} entries, student_logprobs has {num_tokens}")
    for name in ("student_logprobs", "teacher_logprobs"):
        if not named[name].dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {named[name].dtype}")
    check_cu_seqlens(cu_seqlens, num_tokens)
    num_seqs = cu_seqlens.numel() - 1
    for name in ("group_ids", "correct"):
        if named[name].numel() != num_seqs:
            raise ValueError(f"{name} has {named[name].numel()} entries, cu_seqlens describes {num_seqs} sequences")
    if not _is_integer(group_ids):
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if group_ids.numel() and bool((group_ids < 0).any()):
        raise ValueError("group_ids must be non-negative")
    if correct.dtype != torch.bool and not _is_integer(correct):
        raise TypeError(f"correct must be bool (or 0/1 integers), got {correct.dtype}")
    if not math.isfinite(float(margin)):
        raise ValueError(f"margin must be finite, got {margin}")
    if not 0.0 <= float(min_retain_ratio) <= 1.0:
        raise ValueError(f"min_retain_ratio must be in [0, 1], got {min_retain_ratio}")


def check_cu_seqlens(cu_seqlens: Tensor, num_tokens: int) -> None:
    """``cu_seqlens``: 1-D integer [N+1], leading 0, non-decreasing, last entry = ``num_tokens``."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with N+1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    if not _is_integer(cu_seqlens):
        raise TypeError(f"cu_seqlens must be an integer tensor (int32), got {cu_seqlens.dtype}")
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
    if int(cu_seqlens[-1]) != num_tokens:
        raise ValueError(f"cu_seqlens must end at the number of tokens {num_tokens}, got {int(cu_seqlens[-1])}")
    if cu_seqlens.numel() > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
