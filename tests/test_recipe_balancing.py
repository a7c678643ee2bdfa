"""balance_groups (DESIGN.md section 1, step 6) and difficulty_balance / histogram (step 7)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from _recipe_ref import ref_balance_quota, ref_bin, ref_bin_copies
from uniopd_mcore.recipe import balance_groups, bin_labels, difficulty_balance, difficulty_bins, histogram


def kept_counts(group_ids, correct, keep):
    out = {}
    for g, c, k in zip(group_ids.tolist(), correct.tolist(), keep.tolist()):
        kc, ki = out.get(g, (0, 0))
        out[g] = (kc + (k and c), ki + (k and not c))
    return out


# ---------------------------------------------------------------------------------------------
# Step 6: online balancing


def test_twelve_correct_four_incorrect_keeps_four_plus_four():
    group_ids = torch.zeros(16, dtype=torch.long)
    correct = torch.arange(16) < 12
    keep = balance_groups(group_ids, correct, 1.0, generator=torch.Generator().manual_seed(0))
    assert keep[~correct].all()  # the minority class is untouched
    assert int(keep[correct].sum()) == 4


@pytest.mark.parametrize(
    "ratio, n_correct, n_incorrect, expected",
    [
        (1.0, 3, 5, (3, 3)),  # 3 <= floor(5) -> incorrect: 5 > floor(3 / 1) -> keep 3
        (1.5, 3, 5, (3, 2)),  # 3 <= floor(7.5); 5 > floor(3 / 1.5) = 2 -> keep 2
        (0.5, 6, 2, (1, 2)),  # 6 > floor(2 * 0.5) = 1 -> keep 1 correct
        (2.0, 5, 3, (5, 2)),  # 5 <= floor(6); 3 > floor(5 / 2) = 2 -> keep 2 incorrect
        (1.0, 4, 4, (4, 4)),  # already balanced
        (math.inf, 3, 5, (3, 0)),  # only correct
        (0.0, 3, 5, (0, 5)),  # only incorrect
    ],
)
def test_ratios_hand(ratio, n_correct, n_incorrect, expected):
    correct = torch.tensor([True] * n_correct + [False] * n_incorrect)
    keep = balance_groups(torch.full((correct.numel(),), 3), correct, ratio)
    assert (int(keep[correct].sum()), int(keep[~correct].sum())) == expected


def test_one_class_groups_are_untouched():
    group_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    correct = torch.tensor([True, True, True, False, False, True, False])
    for ratio in (0.0, 0.5, 1.0, math.inf):
        keep = balance_groups(group_ids, correct, ratio)
        assert keep[:5].all()


def test_matches_reference_counts_and_is_deterministic():
    rng = random.Random("balance")
    for _ in range(40):
        n = rng.randint(0, 60)
        group_ids = torch.tensor([rng.choice([2, 5, 11, 40, 41]) for _ in range(n)], dtype=torch.long)
        correct = torch.tensor([rng.random() < rng.random() for _ in range(n)], dtype=torch.bool)
        ratio = rng.choice([0.0, 0.5, 0.75, 1.0, 1.2, 1.5, 2.0, math.inf])
        seed = rng.randrange(1000)
        keep = balance_groups(group_ids, correct, ratio, generator=torch.Generator().manual_seed(seed))
        assert keep.dtype == torch.bool and keep.shape == (n,)
        ref = ref_balance_quota(group_ids.tolist(), correct.tolist(), ratio)
        assert kept_counts(group_ids, correct, keep) == {g: ref[g] for g in ref}
        again = balance_groups(group_ids, correct, ratio, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(keep, again)


def test_subset_is_random():
    group_ids = torch.zeros(64, dtype=torch.long)
    correct = torch.arange(64) < 48
    subsets = {tuple(balance_groups(group_ids, correct, generator=torch.Generator().manual_seed(s)).tolist())
               for s in range(5)}  # fmt: skip
    assert len(subsets) == 5


def test_balance_bad_arguments():
    with pytest.raises(ValueError, match="ratio must be >= 0"):
        balance_groups(torch.zeros(2, dtype=torch.long), torch.tensor([True, False]), -1.0)
    with pytest.raises(ValueError, match="equal length"):
        balance_groups(torch.zeros(3, dtype=torch.long), torch.tensor([True, False]))
    with pytest.raises(TypeError, match="integer"):
        balance_groups(torch.zeros(2), torch.tensor([True, False]))


# ---------------------------------------------------------------------------------------------
# Step 7: offline difficulty balancing


def test_difficulty_hand():
    # Mid rates {0.25, 0.5} -> 4 bins: [all wrong, (0, 0.5), [0.5, 1), all correct].
    # Counts [4, 2, 1, 3]; target 4: the two 0.25 prompts get 2 copies each, the 0.5 prompt 4.
    rates = [0, 0, 0, 0, 1, 1, 1, 0.5, 0.25, 0.25]
    repeats = difficulty_balance(rates)
    assert repeats.dtype == torch.long
    assert repeats.tolist() == [1, 1, 1, 1, 1, 1, 1, 4, 2, 2]
    before, after = histogram(rates, repeats)
    assert before.tolist() == [4, 2, 1, 3] and after.tolist() == [4, 4, 4, 3]
    # max_repeat caps each prompt: the 0.5 prompt gets 3.
    assert difficulty_balance(rates, max_repeat=3).tolist() == [1, 1, 1, 1, 1, 1, 1, 3, 2, 2]


def test_uneven_split_and_seed():
    # One all-wrong bin of 10 prompts, three prompts at rate 0.5 -> 10 copies over 3 prompts:
    # 4 + 3 + 3 in some order fixed by the seed.
    rates = [0.0] * 10 + [0.5] * 3
    repeats = difficulty_balance(rates, seed=1)
    assert sorted(repeats[10:].tolist()) == [3, 3, 4]
    assert torch.equal(repeats, difficulty_balance(rates, seed=1))
    assert len({tuple(difficulty_balance(rates, seed=s).tolist()) for s in range(10)}) > 1


def test_bins_from_k_rollouts():
    k = 16
    rates = torch.arange(k + 1, dtype=torch.float64) / k
    assert difficulty_bins(rates, k + 1).tolist() == list(range(k + 1))
    assert difficulty_balance(rates).tolist() == [1] * (k + 1)  # already flat


def test_matches_reference_copies():
    rng = random.Random("difficulty")
    for _ in range(30):
        k = rng.choice([4, 8, 16])
        # A U-shaped or mirrored-J distribution of pass rates from k rollouts.
        weights = [rng.random() * (3 if j in (0, k) else 1) for j in range(k + 1)]
        rates = [rng.choices(range(k + 1), weights)[0] / k for _ in range(rng.randint(1, 200))]
        num_bins = rng.choice([None, 3, 5, k + 1])
        max_repeat = rng.choice([1, 2, 8])
        repeats = difficulty_balance(rates, num_bins=num_bins, max_repeat=max_repeat, seed=rng.randrange(100))
        bins_n = num_bins or len({r for r in rates if 0 < r < 1}) + 2
        bins_n = max(3, bins_n)
        assert ((repeats >= 1) & (repeats <= max_repeat)).all()
        extremes = torch.tensor([r in (0.0, 1.0) for r in rates])
        assert (repeats[extremes] == 1).all()
        _, after = histogram(rates, repeats, bins_n)
        assert after.tolist() == ref_bin_copies(rates, bins_n, max_repeat)
        for b in range(bins_n):  # copies spread as evenly as possible inside a bin
            member = [i for i, r in enumerate(rates) if ref_bin(r, bins_n) == b]
            if member:
                assert int(repeats[member].max() - repeats[member].min()) <= 1


def test_continuous_rates_use_ten_bins():
    rates = torch.linspace(0.001, 0.999, 200, dtype=torch.float64)
    before, _ = histogram(rates)
    assert before.numel() == 10
    assert bin_labels(4) == ["all wrong", "0.00-0.50", "0.50-1.00", "all correct"]


@pytest.mark.parametrize(
    "rates, match", [([0.5, 1.5], r"pass_rates\[1\] = 1.5"), ([0.0, 0.5, float("nan")], r"pass_rates\[2\] = nan"),
                     ([-0.1], r"pass_rates\[0\]")],
)  # fmt: skip
def test_difficulty_bad_rates(rates, match):
    with pytest.raises(ValueError, match=match):
        difficulty_balance(rates)


def test_difficulty_bad_arguments():
    with pytest.raises(ValueError, match="max_repeat"):
        difficulty_balance([0.5], max_repeat=0)
    with pytest.raises(ValueError, match="num_bins"):
        difficulty_balance([0.5], num_bins=2)
    assert difficulty_balance([]).tolist() == []
