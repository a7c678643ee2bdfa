"""Packed batches and micro-batch planning (pure torch / Python, no Megatron)."""

from __future__ import annotations

import random

import pytest
import torch

from uniopd_mcore.data.packing import (
    PackedBatch,
    make_micro_batches,
    pack_sequences,
    position_ids_from_cu_seqlens,
)


def test_pack_sequences_layout():
    seqs = [[5, 6, 7], [1], [2, 3]]
    b = pack_sequences(
        seqs,
        loss_mask=[[0, 1, 1], [0], [0, 1]],
        old_logprobs=[torch.tensor([0.0, -1.0, -2.0]), torch.tensor([0.0]), torch.tensor([0.0, -3.0])],
        per_sequence={"group_ids": [0, 0, 1], "correct": [True, False, True]},
    )
    assert b.input_ids.dtype == torch.long and b.input_ids.tolist() == [5, 6, 7, 1, 2, 3]
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert b.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert b["loss_mask"].dtype == torch.float32 and b["loss_mask"].tolist() == [0, 1, 1, 0, 0, 1]
    assert b["old_logprobs"].tolist() == [0.0, -1.0, -2.0, 0.0, 0.0, -3.0]
    assert b["group_ids"].dtype == torch.int64 and b["correct"].dtype == torch.bool
    assert (b.num_tokens, b.num_sequences, b.max_seqlen) == (6, 3, 3)
    assert b.sequence_ids().tolist() == [0, 0, 0, 1, 2, 2]


def test_pack_rejects_mismatches():
    with pytest.raises(ValueError):
        pack_sequences([[1, 2]], loss_mask=[[1]])
    with pytest.raises(ValueError):
        pack_sequences([[1, 2], []])
    with pytest.raises(ValueError):
        PackedBatch(torch.zeros(3, dtype=torch.long), torch.tensor([0, 3]), seq={"x": torch.zeros(2)})


def test_select_is_a_vectorised_gather():
    seqs = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    b = pack_sequences(seqs, w=[[float(t) for t in s] for s in seqs], per_sequence={"gid": [10, 11, 12, 13]})
    sub = b.select([3, 1])
    assert sub.input_ids.tolist() == [7, 8, 9, 10, 4]
    assert sub.cu_seqlens.tolist() == [0, 4, 5]
    assert sub["w"].tolist() == [7.0, 8.0, 9.0, 10.0, 4.0]
    assert sub["gid"].tolist() == [13, 11]
    assert sub.position_ids.tolist() == [0, 1, 2, 3, 0]


def test_position_ids_restart():
    cu = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    assert position_ids_from_cu_seqlens(cu).tolist() == [0, 1, 0, 1, 2, 0]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dp", [1, 2, 3])
def test_micro_batches_cover_budget_and_balance(seed, dp):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(dp, 40))]
    budget = 100
    plan = make_micro_batches(lengths, budget, dp)
    assert len(plan) == dp
    flat = sorted(i for rank in plan for mb in rank for i in mb)
    assert flat == list(range(len(lengths)))  # every sequence exactly once
    for rank in plan:
        for mb in rank:
            assert mb and sum(lengths[i] for i in mb) <= budget
    tokens = [sum(lengths[i] for mb in rank for i in mb) for rank in plan]
    # longest-first greedy: ranks differ by at most the longest sequence
    assert max(tokens) - min(tokens) <= max(lengths)
    counts = {len(rank) for rank in plan}
    seqs_per_rank = [sum(len(mb) for mb in rank) for rank in plan]
    if min(seqs_per_rank) >= max(len(rank) for rank in plan):
        assert len(counts) == 1  # same number of micro-batches on every DP rank


def test_micro_batches_long_sequence_alone():
    plan = make_micro_batches([500, 10, 20], max_tokens=100, dp_size=1)
    assert [0] in plan[0]
    assert sorted(i for mb in plan[0] for i in mb) == [0, 1, 2]


def test_micro_batches_are_deterministic():
    lengths = [7, 3, 9, 9, 1, 4, 12, 5]
    assert make_micro_batches(lengths, 16, 2) == make_micro_batches(list(lengths), 16, 2)
