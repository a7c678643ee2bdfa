"""uniopd_advantages with a data-parallel group (DESIGN.md section 1, step 5: "group statistics
are summed across data-parallel ranks when a group spans ranks").

Two gloo processes each hold part of a random packed batch, with groups split across the ranks;
every rank's result must equal the single-process result on the union (rank 0's sequences, then
rank 1's), for both statistics, all directions, the greedy mask and calibration "none".
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed
from _recipe_ref import random_batch, select_sequences

from uniopd_mcore.recipe import uniopd_advantages

CONFIGS = [
    dict(statistic="mean", calibration="shift", direction="both"),
    dict(statistic="minmax", calibration="shift", direction="both"),
    dict(statistic="mean", calibration="shift", direction="correct_up"),
    dict(statistic="minmax", calibration="shift", direction="incorrect_down"),
    dict(statistic="mean", calibration="greedy_mask", min_retain_ratio=0.25),
    dict(statistic="minmax", calibration="greedy_mask", min_retain_ratio=0.5),
    dict(statistic="mean", calibration="none"),
]
SPLITS = ("random", "rank1_empty", "max_group_on_rank0")


def assignment(batch, split: str, rng: random.Random) -> list[int]:
    """Rank of every sequence."""
    gids = batch.group_ids.tolist()
    if split == "rank1_empty":
        return [0] * len(gids)
    ranks = [int(rng.random() < 0.5) for _ in gids]
    if split == "max_group_on_rank0" and gids:
        # Rank 1 then only sees smaller ids: the dense group space must come from the all-reduced max.
        ranks = [0 if g == max(gids) else r for g, r in zip(gids, ranks)]
    return ranks


def _worker(rank: int, world_size: int) -> int:
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    group = dist.new_group(list(range(world_size)))  # any process group, not only WORLD
    spanning = 0
    for seed in range(4):
        for split in SPLITS:
            rng = random.Random(f"dp-{seed}-{split}")
            full = random_batch(rng, max_groups=6, max_group_size=10)
            ranks = assignment(full, split, rng)
            index = [[i for i, r in enumerate(ranks) if r == k] for k in range(world_size)]
            union = select_sequences(full, index[0] + index[1])
            local = select_sequences(full, index[rank])
            lo = len(index[0]) if rank == 1 else 0
            hi = lo + len(index[rank])
            tok_lo, tok_hi = int(union.cu_seqlens[lo]), int(union.cu_seqlens[hi])
            groups_on = [{int(full.group_ids[i]) for i in index[k]} for k in range(world_size)]
            spanning += len(groups_on[0] & groups_on[1])
            for config in CONFIGS:
                margin = rng.choice([0.4, 1.0])
                want = uniopd_advantages(*union.args(), margin=margin, **config)
                got = uniopd_advantages(*local.args(), margin=margin, dp_group=group, **config)
                where = f"seed={seed} split={split} config={config} rank={rank}"
                assert torch.equal(got.returns, want.returns[lo:hi]), where
                torch.testing.assert_close(got.shifts, want.shifts[lo:hi], atol=1e-6, rtol=0, msg=where)
                torch.testing.assert_close(got.advantages, want.advantages[tok_lo:tok_hi], atol=1e-6, rtol=0,
                                           msg=where)  # fmt: skip
                assert torch.equal(got.sequence_mask, want.sequence_mask[lo:hi]), where
                assert torch.equal(got.token_mask, want.token_mask[tok_lo:tok_hi]), where
                assert (got.groups_checked, got.groups_violated) == (want.groups_checked, want.groups_violated), where
                assert got.mean_shift == pytest.approx(want.mean_shift, abs=1e-9), where
    return spanning


def test_dp_group_matches_single_process_on_the_union():
    spanning = run_distributed(_worker, world_size=2, start_method="spawn", timeout=240)
    assert spanning[0] == spanning[1] > 0  # some groups really had sequences on both ranks
