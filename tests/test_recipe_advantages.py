"""uniopd_advantages (DESIGN.md section 1, steps 1-5): hand-computed cases, a float64 loop
reference on random packed batches, the calibrated-gap invariant and argument errors."""

from __future__ import annotations

import random
from collections import namedtuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _recipe_ref import SENTINEL, gap_of, random_batch, ref_advantages
from uniopd_mcore.recipe import AdvantageResult, uniopd_advantages

STATISTICS = ("mean", "minmax")
DIRECTIONS = ("both", "correct_up", "incorrect_down")


def one_token_returns(values, correct, group_ids=None):
    """Packed batch where sequence i is [prompt-ish token, one response token] with G_i = values[i]
    exactly (student 0, teacher = value; dyadic values stay exact in float32)."""
    n = len(values)
    teacher = torch.zeros(2 * n)
    teacher[1::2] = torch.tensor(values, dtype=torch.float32)
    loss_mask = torch.tensor([0, 1] * n)
    cu = torch.arange(0, 2 * n + 1, 2, dtype=torch.int32)
    gids = torch.zeros(n, dtype=torch.long) if group_ids is None else torch.tensor(group_ids)
    return torch.zeros(2 * n), teacher, loss_mask, cu, gids, torch.tensor(correct, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# Hand-computed cases


def test_two_correct_two_incorrect_mean_both():
    # Steps 1-2: 3-token sequences, first token untrained; G = 0.125, 0.375 (correct), 0.25, 0.5.
    # Step 4: gap = mean(0.125, 0.375) - mean(0.25, 0.5) = 0.25 - 0.375 = -0.125 < 0.4.
    # Step 5: s = 0.4 + 0.125 = 0.525; both: correct +0.2625, incorrect -0.2625.
    teacher = torch.tensor([0, 0.125, 0.125, 0, 0.375, 0.375, 0, 0.25, 0.25, 0, 0.5, 0.5])
    loss_mask = torch.tensor([0, 1, 1] * 4)
    cu = torch.tensor([0, 3, 6, 9, 12], dtype=torch.int32)
    out = uniopd_advantages(torch.zeros(12), teacher, loss_mask, cu, torch.tensor([7, 7, 7, 7]),
                            torch.tensor([True, True, False, False]))  # fmt: skip
    assert isinstance(out, AdvantageResult)
    torch.testing.assert_close(out.returns, torch.tensor([0.125, 0.375, 0.25, 0.5]))
    torch.testing.assert_close(out.shifts, torch.tensor([0.2625, 0.2625, -0.2625, -0.2625]))
    expected = torch.tensor([0, 0.3875, 0.3875, 0, 0.6375, 0.6375, 0, -0.0125, -0.0125, 0, 0.2375, 0.2375])
    torch.testing.assert_close(out.advantages, expected)
    assert out.token_mask.tolist() == [False, True, True] * 4
    assert out.sequence_mask.all()
    assert (out.groups_checked, out.groups_violated) == (1, 1)
    assert out.mean_shift == pytest.approx(0.525)


@pytest.mark.parametrize(
    "direction, expected",
    [("both", [0.2625, 0.2625, -0.2625, -0.2625]), ("correct_up", [0.525, 0.525, 0.0, 0.0]),
     ("incorrect_down", [0.0, 0.0, -0.525, -0.525])],
)  # fmt: skip
def test_directions(direction, expected):
    args = one_token_returns([0.125, 0.375, 0.25, 0.5], [True, True, False, False])
    out = uniopd_advantages(*args, direction=direction)
    torch.testing.assert_close(out.shifts, torch.tensor(expected))
    torch.testing.assert_close(out.advantages[1::2], torch.tensor([0.125, 0.375, 0.25, 0.5]) + torch.tensor(expected))


def test_minmax_shift():
    # gap = min(0.125, 0.375) - max(0.25, 0.5) = -0.375; s = 0.775.
    args = one_token_returns([0.125, 0.375, 0.25, 0.5], [True, True, False, False])
    out = uniopd_advantages(*args, statistic="minmax")
    torch.testing.assert_close(out.shifts, torch.tensor([0.3875, 0.3875, -0.3875, -0.3875]))
    assert out.mean_shift == pytest.approx(0.775)


def test_consistent_and_one_class_groups_are_left_alone():
    # Group 0: gap = 0.75 - 0.25 = 0.5 >= 0.4 (consistent). Group 1 all correct, group 2 all
    # incorrect (not checked). Group 3: gap = 0 - 0.25 -> s = 0.65.
    values = [0.75, 0.25, -1.0, -2.0, 0.5, 0.0, 0.25]
    correct = [True, False, True, True, False, True, False]
    out = uniopd_advantages(*one_token_returns(values, correct, [0, 0, 1, 1, 2, 3, 3]))
    torch.testing.assert_close(out.shifts, torch.tensor([0, 0, 0, 0, 0, 0.325, -0.325]))
    assert (out.groups_checked, out.groups_violated) == (2, 1)
    assert out.mean_shift == pytest.approx(0.65)


def test_sentinel_empty_and_one_token_sequences():
    # seq 0: [x, 0.5, sentinel] -> G = (0.5 + 0) / 2 = 0.25 (the sentinel counts in the mean);
    # seq 1 empty, seq 2 one token (no log-prob, loss mask 0): G = 0 for both;
    # seq 3: [x, -0.25, 0.75 (loss mask 0)] -> G = -0.25.
    student = torch.zeros(7)
    teacher = torch.tensor([0.0, 0.5, SENTINEL, 0.0, 0.0, -0.25, 0.75])
    loss_mask = torch.tensor([0, 1, 1, 0, 0, 1, 0])
    cu = torch.tensor([0, 3, 3, 4, 7], dtype=torch.int32)
    group_ids = torch.tensor([0, 0, 0, 0])
    correct = torch.tensor([True, False, True, False])
    out = uniopd_advantages(student, teacher, loss_mask, cu, group_ids, correct)
    torch.testing.assert_close(out.returns, torch.tensor([0.25, 0.0, 0.0, -0.25]))
    # gap = mean(0.25, 0) - mean(0, -0.25) = 0.25 -> s = 0.15 -> +-0.075.
    torch.testing.assert_close(out.shifts, torch.tensor([0.075, -0.075, 0.075, -0.075]))
    assert out.token_mask.tolist() == [False, True, False, False, False, True, False]
    torch.testing.assert_close(out.advantages, torch.tensor([0, 0.575, 0, 0, 0, -0.325, 0]))


def test_empty_batch():
    e = torch.zeros(0)
    out = uniopd_advantages(e, e, e.long(), torch.zeros(1, dtype=torch.int32), e.long(), e.bool())
    assert out.advantages.shape == (0,) and out.returns.shape == (0,)
    assert (out.groups_checked, out.groups_violated, out.mean_shift) == (0, 0, 0.0)


def test_greedy_mask_mean_hand():
    # correct [-1, 0.25, 0.5, 0.75] (mean 0.125), incorrect [0.5, 0.125, 0, -0.25] (mean 0.09375):
    # gap 0.03125 < 0.5. Drop worst correct -1 -> gap 0.5 - 0.09375 = 0.40625 (the other option,
    # drop best incorrect 0.5, gives 0.125 + 0.041667 = 0.166667). Next: drop correct 0.25 ->
    # 0.625 - 0.09375 = 0.53125; drop incorrect 0.5 -> 0.5 + 0.041667 = 0.541667: larger, and
    # >= 0.5, stop. Kept: all but correct -1 and incorrect 0.5.
    values = [-1.0, 0.25, 0.5, 0.75, 0.5, 0.125, 0.0, -0.25]
    correct = [True] * 4 + [False] * 4
    out = uniopd_advantages(*one_token_returns(values, correct), margin=0.5, calibration="greedy_mask")
    assert out.sequence_mask.tolist() == [False, True, True, True, False, True, True, True]
    assert torch.equal(out.shifts, torch.zeros(8))
    assert out.token_mask[1::2].tolist() == out.sequence_mask.tolist()
    assert out.advantages[1] == 0 and out.advantages[9] == 0
    torch.testing.assert_close(out.returns, torch.tensor(values))  # returns stay uncalibrated
    assert (out.groups_checked, out.groups_violated, out.mean_shift) == (1, 1, 0.0)


@pytest.mark.parametrize(
    "ratio, kept",
    [
        # min kept 1 per class: gap -1.5 -> drop c -1 (-0.25) -> drop i 0.5 (0.125) -> drop c 0.25
        # (0.375) -> drop c 0.5 (0.625 >= 0.5).
        (0.25, [False, False, False, True, False, True, True, True]),
        # min kept ceil(0.5 * 4) = 2: drop c -1, drop i 0.5, drop c 0.25, then only an incorrect
        # can go: drop 0.125 -> 0.5 - 0 = 0.5 >= 0.5.
        (0.5, [False, False, True, True, False, False, True, True]),
    ],
)
def test_greedy_mask_minmax_hand(ratio, kept):
    values = [-1.0, 0.25, 0.5, 0.75, 0.5, 0.125, 0.0, -0.25]
    correct = [True] * 4 + [False] * 4
    out = uniopd_advantages(*one_token_returns(values, correct), margin=0.5, statistic="minmax",
                            calibration="greedy_mask", min_retain_ratio=ratio)  # fmt: skip
    assert out.sequence_mask.tolist() == kept


def test_greedy_mask_tie_goes_to_correct_and_stops_when_nothing_helps():
    # Tie: correct [0, 1], incorrect [1, 0]: both removals give gap 0.5 -> drop the correct 0.
    out = uniopd_advantages(*one_token_returns([0.0, 1.0, 1.0, 0.0], [True, True, False, False]),
                            calibration="greedy_mask")  # fmt: skip
    assert out.sequence_mask.tolist() == [False, True, True, True]
    # All returns equal: no removal raises the gap, nothing is dropped.
    out = uniopd_advantages(*one_token_returns([0.25] * 4, [True, True, False, False]), calibration="greedy_mask")
    assert out.sequence_mask.all() and out.groups_violated == 1


def test_calibration_none_reports_but_does_not_shift():
    out = uniopd_advantages(*one_token_returns([0.125, 0.375, 0.25, 0.5], [True, True, False, False]),
                            calibration="none")  # fmt: skip
    assert torch.equal(out.shifts, torch.zeros(4)) and out.groups_violated == 1 and out.mean_shift == 0.0


def test_bf16_inputs_and_int64_cu_seqlens():
    args = list(one_token_returns([0.125, 0.375, 0.25, 0.5], [True, True, False, False]))
    args[0], args[1], args[3] = args[0].bfloat16(), args[1].bfloat16(), args[3].long()
    out = uniopd_advantages(*args)
    assert out.advantages.dtype == torch.float32 and out.returns.dtype == torch.float32
    torch.testing.assert_close(out.shifts, torch.tensor([0.2625, 0.2625, -0.2625, -0.2625]))


# ---------------------------------------------------------------------------------------------
# Float64 loop reference on random packed batches


def assert_matches_ref(out: AdvantageResult, ref: dict) -> None:
    torch.testing.assert_close(out.returns, torch.tensor(ref["returns"], dtype=torch.float32), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.shifts, torch.tensor(ref["shifts"], dtype=torch.float32), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.advantages, torch.tensor(ref["advantages"], dtype=torch.float32), atol=1e-6,
                               rtol=1e-6)  # fmt: skip
    assert out.token_mask.tolist() == ref["token_mask"]
    assert out.sequence_mask.tolist() == ref["sequence_mask"]
    assert (out.groups_checked, out.groups_violated) == (ref["groups_checked"], ref["groups_violated"])
    assert out.mean_shift == pytest.approx(ref["mean_shift"], abs=1e-9)


@pytest.mark.parametrize("statistic", STATISTICS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_shift_matches_reference(statistic, direction):
    rng = random.Random(f"shift-{statistic}-{direction}")
    for _ in range(40):
        batch = random_batch(rng)
        margin = rng.choice([0.0, 0.4, 1.5])
        out = uniopd_advantages(*batch.args(), margin=margin, statistic=statistic, direction=direction)
        assert_matches_ref(out, ref_advantages(batch, margin=margin, statistic=statistic, direction=direction))


@pytest.mark.parametrize("statistic", STATISTICS)
def test_greedy_mask_matches_reference(statistic):
    rng = random.Random(f"greedy-{statistic}")
    for _ in range(60):
        batch = random_batch(rng, max_group_size=10)
        margin = rng.choice([0.4, 1.0, 3.0])
        ratio = rng.choice([0.0, 0.25, 0.5, 1.0])
        out = uniopd_advantages(*batch.args(), margin=margin, statistic=statistic, calibration="greedy_mask",
                                min_retain_ratio=ratio)  # fmt: skip
        ref = ref_advantages(batch, margin=margin, statistic=statistic, calibration="greedy_mask",
                             min_retain_ratio=ratio)  # fmt: skip
        assert_matches_ref(out, ref)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), statistic=st.sampled_from(STATISTICS), direction=st.sampled_from(DIRECTIONS),
       margin=st.floats(0.0, 2.0))  # fmt: skip
def test_calibrated_gap_equals_margin(seed, statistic, direction, margin):
    """After the shift, the gap computed on returns + shifts is exactly the margin for violated
    groups (every sequence of a class moves by the same amount, so this holds for minmax too)."""
    batch = random_batch(random.Random(seed))
    out = uniopd_advantages(*batch.args(), margin=margin, statistic=statistic, direction=direction)
    before = out.returns.double()
    after = before + out.shifts.double()
    gids, correct = batch.group_ids.tolist(), batch.correct.tolist()
    violated = 0
    for gid in set(gids):
        pos = [i for i, g in enumerate(gids) if g == gid and correct[i]]
        neg = [i for i, g in enumerate(gids) if g == gid and not correct[i]]
        if not pos or not neg:
            assert all(out.shifts[i] == 0 for i in pos + neg)
            continue
        gap = gap_of(before[pos].tolist(), before[neg].tolist(), statistic)
        if gap < margin - 1e-6:
            violated += 1
            assert gap_of(after[pos].tolist(), after[neg].tolist(), statistic) == pytest.approx(margin, abs=1e-6)
        elif gap >= margin + 1e-6:
            assert all(out.shifts[i] == 0 for i in pos + neg)
    assert abs(out.groups_violated - violated) <= 1  # a group exactly at the margin may go either way


# ---------------------------------------------------------------------------------------------
# Argument errors and backend dispatch


def good_args():
    return list(one_token_returns([0.125, 0.375, 0.25, 0.5], [True, True, False, False]))


@pytest.mark.parametrize(
    "name, value, allowed",
    [("statistic", "median", "'mean', 'minmax'"), ("direction", "up", "'both', 'correct_up', 'incorrect_down'"),
     ("calibration", "mask", "'shift', 'greedy_mask', 'none'"), ("backend", "cuda", "'torch', 'triton', 'auto'")],
)  # fmt: skip
def test_unknown_names_list_the_allowed_values(name, value, allowed):
    with pytest.raises(ValueError, match=f"unknown {name} '{value}'; allowed: {allowed}"):
        uniopd_advantages(*good_args(), **{name: value})


@pytest.mark.parametrize(
    "index, value, error, match",
    [
        (3, torch.tensor([0, 2, 4, 6, 8.0]), TypeError, "cu_seqlens must be an integer"),
        (3, torch.tensor([0, 4, 2, 6, 8], dtype=torch.int32), ValueError, "non-decreasing"),
        (3, torch.tensor([1, 2, 4, 6, 8], dtype=torch.int32), ValueError, "start at 0"),
        (3, torch.tensor([0, 2, 4, 6, 7], dtype=torch.int32), ValueError, "end at the number of tokens 8"),
        (1, torch.zeros(7), ValueError, "teacher_logprobs has 7 entries"),
        (2, torch.zeros(8, 1), ValueError, "loss_mask must be 1-D"),
        (4, torch.tensor([0, 0, 0]), ValueError, "group_ids has 3 entries, cu_seqlens describes 4"),
        (4, torch.tensor([0, 0, -1, 0]), ValueError, "non-negative"),
        (4, torch.zeros(4), TypeError, "group_ids must be an integer"),
        (5, torch.zeros(4, dtype=torch.float32), TypeError, "correct must be bool"),
        (0, torch.zeros(8, dtype=torch.long), TypeError, "student_logprobs must be floating"),
    ],
)
def test_bad_arguments(index, value, error, match):
    args = good_args()
    args[index] = value
    with pytest.raises(error, match=match):
        uniopd_advantages(*args)


def test_bad_scalars():
    with pytest.raises(ValueError, match="min_retain_ratio"):
        uniopd_advantages(*good_args(), min_retain_ratio=1.5)
    with pytest.raises(ValueError, match="margin must be finite"):
        uniopd_advantages(*good_args(), margin=float("nan"))


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device or TRITON_INTERPRET=1"):
        uniopd_advantages(*good_args(), backend="triton")


def test_triton_backend_without_kernel(monkeypatch):
    import uniopd_kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delattr(uniopd_kernels, "uniopd_advantages", raising=False)
    with pytest.raises(RuntimeError, match="no uniopd_advantages"):
        uniopd_advantages(*good_args(), backend="triton")


def test_triton_backend_dispatch_and_auto(monkeypatch):
    import uniopd_kernels

    fields = "advantages token_mask returns shifts sequence_mask groups_checked groups_violated mean_shift"
    Fake = namedtuple("Fake", fields)
    seen = {}

    def fake_kernel(*args, **kwargs):
        seen.update(kwargs)
        return Fake(*uniopd_advantages(*args, **kwargs).__dict__.values())

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(uniopd_kernels, "uniopd_advantages", fake_kernel, raising=False)
    out = uniopd_advantages(*good_args(), backend="triton", statistic="minmax")
    assert isinstance(out, AdvantageResult) and "backend" not in seen and seen["statistic"] == "minmax"
    torch.testing.assert_close(out.shifts, torch.tensor([0.3875, 0.3875, -0.3875, -0.3875]))
    # auto: triton only with CUDA.
    seen.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    uniopd_advantages(*good_args(), backend="auto")
    assert not seen
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    uniopd_advantages(*good_args(), backend="auto")
    assert seen
