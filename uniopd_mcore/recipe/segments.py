"""Segment helpers for the packed token stream (no Python loop over sequences or groups).

A *segment* is a run of consecutive entries: the tokens of one sequence in the packed stream, or,
after a stable sort by group, the sequences of one group. Reductions go through
``torch.segment_reduce`` over contiguous runs rather than ``index_add_``: the summation order is
then fixed (left to right within a segment), so float64 sums are reproducible on every device,
where atomics would make the last bits depend on scheduling.
"""

from __future__ import annotations

import torch
from torch import Tensor

_INITIAL = {"sum": 0.0, "min": float("inf"), "max": float("-inf")}


def sequence_lengths(cu_seqlens: Tensor) -> Tensor:
    """Lengths [N] (int64) from ``cu_seqlens`` [N+1]; repeated entries give empty sequences."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def sequence_ids(cu_seqlens: Tensor, num_tokens: int | None = None) -> Tensor:
    """Sequence index [T] (int64) of every token of the packed stream."""
    lengths = sequence_lengths(cu_seqlens)
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device)
    # output_size avoids a device->host sync for the total length when the caller knows it.
    return torch.repeat_interleave(ids, lengths, output_size=num_tokens)


def segment_reduce(values: Tensor, lengths: Tensor, reduce: str = "sum") -> Tensor:
    """Reduce consecutive runs of ``values`` of the given ``lengths`` ("sum", "min" or "max").

    Empty segments give 0 (sum), +inf (min) or -inf (max). Differentiable for "sum".
    """
    if values.numel() == 0:
        # segment_reduce cannot reduce an empty input; every segment is empty then. Adding the
        # (zero) sum keeps the result attached to the autograd graph of ``values``.
        out = values.new_full((lengths.numel(),), _INITIAL[reduce])
        return out + values.sum() if reduce == "sum" else out
    return torch.segment_reduce(values, reduce, lengths=lengths, initial=_INITIAL[reduce])


def sequence_sum(values: Tensor, cu_seqlens: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-sequence sums [N] of a token array [T], accumulated in ``dtype`` (float64 by default)."""
    return segment_reduce(values.to(dtype), sequence_lengths(cu_seqlens), "sum")


def grouped_reduce(values: Tensor, index: Tensor, num_segments: int, reduce: str = "sum") -> Tensor:
    """Reduce ``values`` [N] by a dense ``index`` [N] in [0, num_segments) (entries need not be
    contiguous): a stable sort by index makes each segment a run, then ``segment_reduce``."""
    order = torch.argsort(index, stable=True)
    lengths = torch.bincount(index, minlength=num_segments)
    return segment_reduce(values[order], lengths, reduce)


def lexsort(*keys: Tensor) -> Tensor:
    """Permutation sorting by ``keys[0]``, ties by ``keys[1]``, ...; remaining ties keep the input
    order (stable), which makes every decision taken on the sorted order deterministic."""
    if not keys:
        raise ValueError("lexsort needs at least one key")
    order = torch.arange(keys[0].numel(), device=keys[0].device)
    # Stable sorts from the least significant key to the most significant one.
    for key in reversed(keys):
        order = order[torch.argsort(key[order], stable=True)]
    return order


def rank_within_segments(sorted_segment: Tensor, num_segments: int) -> Tensor:
    """Position of each entry inside its segment, for a segment index that is already sorted."""
    counts = torch.bincount(sorted_segment, minlength=num_segments)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sorted_segment.numel(), device=sorted_segment.device) - starts[sorted_segment]


def dense_group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary non-negative group ids to a dense index [N] in [0, num_groups)."""
    if group_ids.numel() == 0:
        return group_ids.long(), 0
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse.long(), int(uniq.numel())
