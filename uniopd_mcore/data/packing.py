"""Packed batches: N sequences as one flat token stream with cu_seqlens (the THD layout).

Conventions (contracts.md): `input_ids [T]` long, `cu_seqlens [N+1]` int32 with a leading 0,
per-token tensors `[T]` aligned with `input_ids` (entry t of a log-prob array is
log p(x_t | x_<t), so the first token of every sequence has none), per-sequence tensors `[N]`.

`make_micro_batches(lengths, max_tokens, dp_size)` plans which sequences go to which data-parallel
rank and micro-batch: tokens balanced over ranks (longest-first greedy), then each rank's share
packed under the token budget (first-fit decreasing) and evened out (longest-first greedy over
the same number of bins), with every rank getting the same number of micro-batches whenever it
holds that many sequences. Pure Python on lengths only: every rank computes the same plan.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor


@dataclass
class PackedBatch:
    """One packed micro-batch (or a whole step's batch before splitting)."""

    input_ids: Tensor  # [T] long
    cu_seqlens: Tensor  # [N+1] int32
    position_ids: Tensor | None = None  # [T] long, restarts at 0 per sequence (optional)
    token: dict[str, Tensor] = field(default_factory=dict)  # name -> [T]
    seq: dict[str, Tensor] = field(default_factory=dict)  # name -> [N]

    def __post_init__(self) -> None:
        if self.cu_seqlens.dtype != torch.int32:
            self.cu_seqlens = self.cu_seqlens.to(torch.int32)
        total = self.num_tokens
        for name, t in self.token.items():
            if t.shape[0] != total:
                raise ValueError(f"per-token tensor {name!r} has {t.shape[0]} entries, T = {total}")
        for name, t in self.seq.items():
            if t.shape[0] != self.num_sequences:
                raise ValueError(f"per-sequence tensor {name!r} has {t.shape[0]} entries, N = {self.num_sequences}")

    # sizes -----------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def seq_lens(self) -> Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @property
    def max_seqlen(self) -> int:
        return int(self.seq_lens.max()) if self.num_sequences else 0

    def sequence_ids(self) -> Tensor:
        """[T] long: index of the sequence each token belongs to."""
        return torch.repeat_interleave(
            torch.arange(self.num_sequences, device=self.input_ids.device), self.seq_lens.to(self.input_ids.device)
        )

    # access ----------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        if name in self.token:
            return self.token[name]
        if name in self.seq:
            return self.seq[name]
        raise KeyError(name)

    def __contains__(self, name: str) -> bool:
        return name in self.token or name in self.seq

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    # transforms ------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> "PackedBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedBatch(
            input_ids=move(self.input_ids),
            cu_seqlens=move(self.cu_seqlens),
            position_ids=move(self.position_ids),
            token={k: move(v) for k, v in self.token.items()},
            seq={k: move(v) for k, v in self.seq.items()},
        )

    def select(self, indices: Sequence[int] | Tensor) -> "PackedBatch":
        """The sub-batch of the given sequences, in the given order (vectorised gather)."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.input_ids.device)
        lens = self.seq_lens.to(idx.device)[idx]
        starts = self.cu_seqlens.long().to(idx.device)[idx]
        cu = torch.zeros(idx.numel() + 1, dtype=torch.long, device=idx.device)
        cu[1:] = torch.cumsum(lens, 0)
        # token index = start of its sequence + offset within it
        offset = torch.arange(int(cu[-1]), device=idx.device) - torch.repeat_interleave(cu[:-1], lens)
        tok = torch.repeat_interleave(starts, lens) + offset
        return PackedBatch(
            input_ids=self.input_ids[tok],
            cu_seqlens=cu.to(torch.int32),
            position_ids=None if self.position_ids is None else self.position_ids[tok],
            token={k: v[tok] for k, v in self.token.items()},
            seq={k: v[idx.to(v.device)] for k, v in self.seq.items()},
        )


def position_ids_from_cu_seqlens(cu_seqlens: Tensor) -> Tensor:
    """[T] positions restarting at 0 at every sequence start."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    return torch.arange(int(cu[-1]), device=cu.device) - torch.repeat_interleave(cu[:-1], lens)


def _flat(values: Sequence[Any], lengths: list[int], name: str, dtype: torch.dtype) -> Tensor:
    if len(values) != len(lengths):
        raise ValueError(f"{name!r} has {len(values)} sequences, expected {len(lengths)}")
    parts = []
    for i, (v, n) in enumerate(zip(values, lengths)):
        t = v if isinstance(v, Tensor) else torch.tensor(v, dtype=dtype)
        if t.numel() != n:
            raise ValueError(f"{name!r}[{i}] has {t.numel()} entries, sequence has {n} tokens")
        parts.append(t.reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def pack_sequences(
    seqs: Sequence[Sequence[int] | Tensor],
    *,
    per_sequence: Mapping[str, Sequence[Any] | Tensor] | None = None,
    with_position_ids: bool = True,
    **per_token_lists: Sequence[Sequence[float] | Tensor],
) -> PackedBatch:
    """Pack token lists into a PackedBatch.

    per_token_lists: name -> one list/tensor per sequence, same lengths as `seqs` (python lists
    become float32; tensors keep their dtype). per_sequence: name -> N values (tensor dtype kept;
    lists converted by torch.tensor, e.g. group ids -> int64, correct -> bool).
    """
    lengths = [len(s) for s in seqs]
    if any(n == 0 for n in lengths):
        raise ValueError("empty sequences cannot be packed")
    input_ids = _flat(seqs, lengths, "input_ids", torch.long).long()
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    token = {k: _flat(v, lengths, k, torch.float32) for k, v in per_token_lists.items()}
    seq = {}
    for k, v in (per_sequence or {}).items():
        t = v if isinstance(v, Tensor) else torch.tensor(list(v))
        seq[k] = t
    return PackedBatch(
        input_ids=input_ids,
        cu_seqlens=cu,
        position_ids=position_ids_from_cu_seqlens(cu) if with_position_ids else None,
        token=token,
        seq=seq,
    )


# ----------------------------------------------------------------------------------------------
# Micro-batch planning


def _greedy_partition(items: list[int], lengths: Sequence[int], k: int) -> list[list[int]]:
    """Longest-first onto the currently lightest of k bins (ties: fewer sequences, lower index)."""
    bins: list[list[int]] = [[] for _ in range(k)]
    heap = [(0, 0, b) for b in range(k)]
    for i in sorted(items, key=lambda j: (-lengths[j], j)):
        load, count, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], count + 1, b))
    return bins


def _first_fit_decreasing(items: list[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(items, key=lambda j: (-lengths[j], j)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:  # a sequence longer than max_tokens gets a micro-batch of its own
            bins.append([i])
            loads.append(lengths[i])
    return bins


def _pack_rank(items: list[int], lengths: Sequence[int], max_tokens: int, k: int) -> list[list[int]]:
    """k micro-batches under the budget, as even as the greedy gets; FFD's if that fails."""
    ffd = _first_fit_decreasing(items, lengths, max_tokens)
    k = min(max(k, len(ffd)), len(items))
    even = _greedy_partition(items, lengths, k)
    limit = max(max_tokens, max((lengths[i] for i in items), default=0))
    if all(sum(lengths[i] for i in b) <= limit for b in even):
        return even
    return ffd


def make_micro_batches(lengths: Sequence[int], max_tokens: int, dp_size: int = 1) -> list[list[list[int]]]:
    """plan[dp_rank][micro_batch] = sorted sequence indices.

    Tokens are balanced over DP ranks; each micro-batch holds at most `max_tokens` tokens unless
    a single sequence is longer; all ranks get the same number of micro-batches when they have
    enough sequences (a rank with fewer sequences than that gets one per sequence).
    """
    if max_tokens <= 0 or dp_size <= 0:
        raise ValueError("max_tokens and dp_size must be positive")
    per_rank = _greedy_partition(list(range(len(lengths))), lengths, dp_size)
    need = max((len(_first_fit_decreasing(r, lengths, max_tokens)) for r in per_rank), default=0)
    plan = []
    for items in per_rank:
        bins = _pack_rank(items, lengths, max_tokens, need) if items else []
        # stable order: micro-batches by their first sequence, sequences ascending
        plan.append(sorted((sorted(b) for b in bins if b), key=lambda b: b[0]))
    return plan
