"""Correctness- and difficulty-aware data balancing: DESIGN.md section 1, steps 6 and 7.

Step 6 (online, per step): inside each mixed group, a random subset of the majority class gets
loss mask 0 until correct : incorrect = ratio. Masked sequences still count in the margin
statistics of step 4, so the caller applies the returned mask to ``loss_mask`` only.

Step 7 (offline, per data set): prompts whose pass rate over k student rollouts lies strictly
between 0 and 1 are repeated so that the histogram of pass rates becomes roughly flat; no prompt
is dropped.

Both are vectorised: random keys, a lexicographic sort by (segment, key) and each entry's rank
inside its segment replace per-group loops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .segments import dense_group_index
from .segments import lexsort
from .segments import rank_within_segments

# More distinct mid-difficulty rates than this are treated as continuous (10 equal bins).
_MAX_DISCRETE_RATES = 62
_CONTINUOUS_BINS = 10


# ---------------------------------------------------------------------------------------------
# Step 6: online correctness-aware balancing


def balance_groups(
    group_ids: Tensor, correct: Tensor, ratio: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Step 6: which sequences keep their loss mask, [N] bool.

    Only mixed groups change. If ``n_correct > floor(n_incorrect * ratio)`` a random
    ``floor(n_incorrect * ratio)`` of the correct sequences is kept; elif
    ``n_incorrect > floor(n_correct / ratio)`` a random ``floor(n_correct / ratio)`` of the
    incorrect ones. ``ratio=inf`` keeps only correct sequences, ``ratio=0`` only incorrect ones.
    Example: 12 correct / 4 incorrect with ratio 1 keeps 4 + 4.
    """
    if group_ids.dim() != 1 or correct.dim() != 1 or group_ids.numel() != correct.numel():
        raise ValueError(
            f"group_ids and correct must be 1-D of equal length, got {tuple(group_ids.shape)} and {tuple(correct.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    ratio = float(ratio)
    if math.isnan(ratio) or ratio < 0:
        raise ValueError(f"ratio must be >= 0 (inf allowed), got {ratio}")
    num_seqs = group_ids.numel()
    device = group_ids.device
    if num_seqs == 0:
        return torch.ones(0, dtype=torch.bool, device=device)

    correct = correct.bool()
    gidx, num_groups = dense_group_index(group_ids)
    seg = gidx * 2 + (~correct).long()  # 2k: correct of group k, 2k+1: incorrect
    counts = torch.bincount(seg, minlength=2 * num_groups).view(num_groups, 2).double()
    n_correct, n_incorrect = counts.unbind(1)
    mixed = (counts > 0).all(dim=1)
    # Float64 inf handles ratio = inf (n * inf) and ratio = 0 (n / 0) without special cases;
    # both counts are > 0 in mixed groups, so no 0 * inf appears there.
    want_correct = torch.floor(n_incorrect * ratio)
    want_incorrect = torch.floor(n_correct / ratio) if ratio > 0 else torch.full_like(n_correct, math.inf)
    cut_correct = mixed & (n_correct > want_correct)
    cut_incorrect = mixed & ~cut_correct & (n_incorrect > want_incorrect)
    quota = torch.stack(
        [torch.where(cut_correct, want_correct, n_correct), torch.where(cut_incorrect, want_incorrect, n_incorrect)],
        dim=1,
    )

    # A random subset of each class = the entries whose random key ranks below the quota.
    keys = torch.rand(num_seqs, generator=generator, device=generator.device if generator else device).to(device)
    order = lexsort(seg, keys)
    rank = rank_within_segments(seg[order], 2 * num_groups)
    keep = torch.empty(num_seqs, dtype=torch.bool, device=device)
    keep[order] = rank < quota.flatten()[seg[order]]
    return keep


# ---------------------------------------------------------------------------------------------
# Step 7: offline difficulty-aware balancing


def difficulty_balance(
    pass_rates: Tensor | Sequence[float],
    *,
    num_bins: int | None = None,
    max_repeat: int = 8,
    seed: int = 0,
) -> Tensor:
    """Step 7: repeat count [P] (int64, >= 1) of every prompt.

    Bins (see :func:`difficulty_bins`): bin 0 = all wrong (rate 0), bin B-1 = all correct
    (rate 1), bins 1..B-2 split (0, 1) evenly. The target per bin is the largest bin count; a
    mid bin with c prompts gets ``min(target, c * max_repeat)`` copies in all, spread as evenly as
    possible (repeats differ by at most 1; which prompts get the extra copy is random, fixed by
    ``seed``). Rate 0 and rate 1 prompts get repeat 1, and nobody gets 0.
    """
    rates = _as_rates(pass_rates)
    if isinstance(max_repeat, bool) or not isinstance(max_repeat, int) or max_repeat < 1:
        raise ValueError(f"max_repeat must be an integer >= 1, got {max_repeat!r}")
    num_bins = default_num_bins(rates) if num_bins is None else _check_num_bins(num_bins)
    if rates.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    bins = difficulty_bins(rates, num_bins)
    counts = torch.bincount(bins, minlength=num_bins)
    copies = torch.minimum(counts.max(), counts * max_repeat)
    copies[0], copies[-1] = counts[0], counts[-1]  # all-wrong / all-correct stay as they are
    per_prompt = counts.clamp(min=1)
    base, extra = copies // per_prompt, copies % per_prompt

    generator = torch.Generator().manual_seed(seed)
    keys = torch.rand(rates.numel(), generator=generator, dtype=torch.float64)
    order = lexsort(bins, keys)
    rank = rank_within_segments(bins[order], num_bins)
    repeats = torch.empty_like(bins)
    repeats[order] = base[bins[order]] + (rank < extra[bins[order]]).long()
    return repeats


def histogram(
    pass_rates: Tensor | Sequence[float], repeats: Tensor | None = None, num_bins: int | None = None
) -> tuple[Tensor, Tensor]:
    """Prompt counts per difficulty bin before and after repeating (int64 [B] each)."""
    rates = _as_rates(pass_rates)
    num_bins = default_num_bins(rates) if num_bins is None else _check_num_bins(num_bins)
    bins = difficulty_bins(rates, num_bins)
    before = torch.bincount(bins, minlength=num_bins)
    if repeats is None:
        return before, before.clone()
    repeats = torch.as_tensor(repeats).long()
    if repeats.shape != rates.shape:
        raise ValueError(f"repeats has shape {tuple(repeats.shape)}, pass_rates {tuple(rates.shape)}")
    after = torch.zeros(num_bins, dtype=torch.long).index_add_(0, bins, repeats)
    return before, after


def difficulty_bins(rates: Tensor, num_bins: int) -> Tensor:
    """Bin [P] of each pass rate: 0 for rate 0, B-1 for rate 1, 1..B-2 split (0, 1) evenly.

    With rates j/k from k rollouts and B = k + 1, rate j/k lands in bin j: the mid value
    j/k * (k - 1) = j - j/k lies strictly between j - 1 and j.
    """
    num_bins = _check_num_bins(num_bins)
    mid = 1 + torch.clamp(torch.floor(rates * (num_bins - 2)).long(), max=num_bins - 3)
    return torch.where(rates <= 0, 0, torch.where(rates >= 1, num_bins - 1, mid))


def bin_labels(num_bins: int) -> list[str]:
    """Labels for a histogram picture: "all wrong", the (lo, hi) ranges, "all correct"."""
    num_bins = _check_num_bins(num_bins)
    width = 1.0 / (num_bins - 2)
    mids = [f"{j * width:.2f}-{(j + 1) * width:.2f}" for j in range(num_bins - 2)]
    return ["all wrong", *mids, "all correct"]


def default_num_bins(rates: Tensor) -> int:
    """One bin per distinct mid rate plus the two extremes (k + 1 bins for rates from k
    rollouts); more than 62 distinct mid rates count as continuous: 10 bins."""
    rates = _as_rates(rates)
    distinct = torch.unique(rates[(rates > 0) & (rates < 1)]).numel()
    return _CONTINUOUS_BINS if distinct > _MAX_DISCRETE_RATES else max(3, distinct + 2)


def _check_num_bins(num_bins: int) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 3:
        raise ValueError(f"num_bins must be an integer >= 3 (all wrong, >= 1 mid bin, all correct), got {num_bins!r}")
    return num_bins


def _as_rates(pass_rates: Tensor | Sequence[float]) -> Tensor:
    rates = torch.as_tensor(pass_rates, dtype=torch.float64).cpu()
    if rates.dim() != 1:
        raise ValueError(f"pass_rates must be 1-D, got shape {tuple(rates.shape)}")
    bad = torch.nonzero(torch.isnan(rates) | (rates < 0) | (rates > 1)).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"pass_rates[{i}] = {float(rates[i])} is not a rate in [0, 1]")
    return rates
