"""uniopd_advantages (Triton) against a float64 formulation and the recipe's torch function."""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from uniopd_kernels import AdvantageOutput  # noqa: E402
from uniopd_kernels import uniopd_advantages  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STATISTICS = ["mean", "minmax"]
DIRECTIONS = ["both", "correct_up", "incorrect_down"]
COEF = {"both": (0.5, -0.5), "correct_up": (1.0, 0.0), "incorrect_down": (0.0, -1.0)}
FIELDS = ("advantages", "token_mask", "returns", "shifts", "sequence_mask", "groups_checked",
          "groups_violated", "mean_shift")  # fmt: skip


def make_batch(seed: int = 0, n_groups: int = 7, group_size: int = 5, max_len: int = 12):
    """A packed batch with every odd case: empty sequences, prompt tokens (loss mask 0), teacher
    sentinels (one sequence all sentinel), all-correct / all-incorrect groups, sparse group ids
    (only even ids), groups interleaved in the stream, and one group consistent by a wide margin."""
    gen = torch.Generator().manual_seed(seed)
    n_seq = n_groups * group_size
    group_ids = (torch.arange(n_seq) % n_groups) * 2
    group_ids = group_ids[torch.randperm(n_seq, generator=gen)]
    wide = group_ids == 4  # this group gets returns +-1.5: consistent for both statistics
    lengths = torch.randint(0, max_len + 1, (n_seq,), generator=gen)
    lengths[::6] = 0
    lengths[wide] = 6
    cu = torch.zeros(n_seq + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    n_tok = int(cu[-1])
    student = -torch.rand(n_tok, generator=gen) * 4
    teacher = -torch.rand(n_tok, generator=gen) * 4
    teacher[torch.rand(n_tok, generator=gen) < 0.1] = -100.0
    loss_mask = torch.ones(n_tok, dtype=torch.bool)
    for i in range(n_seq):  # a prompt prefix of 0-2 tokens
        a = int(cu[i])
        loss_mask[a : a + int(torch.randint(0, 3, (1,), generator=gen))] = False
    big = int(torch.argmax(torch.where(wide, 0, lengths)))
    teacher[int(cu[big]) : int(cu[big + 1])] = -100.0
    correct = torch.rand(n_seq, generator=gen) < 0.5
    correct[group_ids == 0] = True
    correct[group_ids == 2] = False
    correct[wide] = torch.arange(int(wide.sum())) % 2 == 0
    for i in torch.nonzero(wide).flatten().tolist():
        a, b = int(cu[i]), int(cu[i + 1])
        teacher[a:b] = student[a:b] + (1.5 if correct[i] else -1.5)
    to = dict(device=DEVICE)
    return (student.to(**to), teacher.to(**to), loss_mask.to(**to), cu.to(**to), group_ids.to(**to),
            correct.to(**to))  # fmt: skip


def reference64(student, teacher, loss_mask, cu, group_ids, correct, margin, statistic, direction, calibration):
    """Plain float64 loops over sequences and groups, written from DESIGN.md section 1."""
    s, t = student.double().cpu(), teacher.double().cpu()
    lm, cu = (loss_mask != 0).cpu(), cu.cpu().tolist()
    gids, ok = group_ids.cpu().tolist(), correct.cpu().bool().tolist()
    r = torch.where(t == -100.0, 0.0, t - s)
    n_seq = len(cu) - 1
    returns = torch.zeros(n_seq, dtype=torch.float64)
    for i in range(n_seq):
        m = lm[cu[i] : cu[i + 1]]
        if m.sum() > 0:
            returns[i] = r[cu[i] : cu[i + 1]][m].sum() / m.sum()
    members = defaultdict(list)
    for i, g in enumerate(gids):
        members[g].append(i)
    shifts = torch.zeros(n_seq, dtype=torch.float64)
    checked = violated = 0
    applied = []
    for idx in members.values():
        pos = [returns[i] for i in idx if ok[i]]
        neg = [returns[i] for i in idx if not ok[i]]
        if not pos or not neg:
            continue
        checked += 1
        gap = (sum(pos) / len(pos) - sum(neg) / len(neg)) if statistic == "mean" else (min(pos) - max(neg))
        if gap < margin:
            violated += 1
            if calibration == "shift":
                applied.append(abs(margin - gap))
                for i in idx:
                    shifts[i] = (margin - gap) * COEF[direction][0 if ok[i] else 1]
    seq = torch.repeat_interleave(torch.arange(n_seq), torch.tensor(cu).diff())
    token_mask = lm & (t != -100.0)
    adv = torch.where(token_mask, r + shifts[seq], 0.0)
    mean_shift = float(sum(applied) / len(applied)) if applied else 0.0
    return AdvantageOutput(adv, token_mask, returns, shifts, torch.ones(n_seq, dtype=torch.bool), checked,
                           violated, mean_shift)  # fmt: skip


def assert_same(out, ref, atol=1e-6):
    for name in ("advantages", "returns", "shifts"):
        torch.testing.assert_close(getattr(out, name).double().cpu(), getattr(ref, name).double().cpu(),
                                   atol=atol, rtol=1e-6, msg=name)  # fmt: skip
    for name in ("token_mask", "sequence_mask"):
        assert torch.equal(getattr(out, name).cpu(), getattr(ref, name).cpu()), name
    assert (out.groups_checked, out.groups_violated) == (ref.groups_checked, ref.groups_violated)
    assert out.mean_shift == pytest.approx(ref.mean_shift, abs=1e-6)


@pytest.mark.parametrize("calibration", ["shift", "none"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("statistic", STATISTICS)
def test_matches_float64(statistic, direction, calibration):
    batch = make_batch(seed=1)
    out = uniopd_advantages(*batch, statistic=statistic, direction=direction, calibration=calibration)
    assert isinstance(out, AdvantageOutput) and out._fields == FIELDS
    assert out.advantages.dtype == torch.float32 and out.returns.dtype == torch.float32
    assert out.token_mask.dtype == torch.bool
    ref = reference64(*batch, 0.4, statistic, direction, calibration)
    assert ref.groups_violated > 0 and ref.groups_checked > ref.groups_violated  # both kinds occur
    assert_same(out, ref)


@pytest.mark.parametrize("statistic", STATISTICS)
def test_calibrated_gap_equals_margin(statistic):
    batch = make_batch(seed=2)
    _, _, _, _, group_ids, correct = batch
    out = uniopd_advantages(*batch, statistic=statistic, margin=0.7)
    calibrated = (out.returns + out.shifts).double().cpu()
    gids, ok = group_ids.cpu(), correct.cpu()
    for g in gids.unique():
        pos, neg = calibrated[(gids == g) & ok], calibrated[(gids == g) & ~ok]
        if len(pos) and len(neg) and out.shifts.cpu()[gids == g].abs().sum() > 0:
            gap = pos.mean() - neg.mean() if statistic == "mean" else pos.min() - neg.max()
            assert float(gap) == pytest.approx(0.7, abs=1e-6)


@pytest.mark.parametrize("calibration", ["shift", "none"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("statistic", STATISTICS)
def test_matches_recipe(statistic, direction, calibration):
    recipe = pytest.importorskip("uniopd_mcore.recipe.advantages", reason="recipe torch function not written yet")
    batch = make_batch(seed=3)
    kw = dict(statistic=statistic, direction=direction, calibration=calibration)
    ref = recipe.uniopd_advantages(*batch, backend="torch", **kw)
    out = uniopd_advantages(*batch, **kw)
    assert_same(out, ref, atol=1e-7)
    # The recipe's own dispatch to this kernel returns the same numbers.
    via = recipe.uniopd_advantages(*batch, backend="triton", **kw)
    assert torch.equal(via.advantages, out.advantages) and torch.equal(via.shifts, out.shifts)


def test_deterministic_and_input_dtypes():
    student, teacher, loss_mask, cu, group_ids, correct = make_batch(seed=4)
    a = uniopd_advantages(student, teacher, loss_mask, cu, group_ids, correct)
    b = uniopd_advantages(student, teacher, loss_mask, cu, group_ids, correct)
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, name
    # float / int masks, int64 offsets and int correctness flags mean the same thing
    c = uniopd_advantages(student, teacher, loss_mask.float(), cu.long(), group_ids, correct.int())
    assert torch.equal(a.advantages, c.advantages) and torch.equal(a.token_mask, c.token_mask)
    # bf16 log-probs: same as feeding their fp32 values
    sb, tb = student.bfloat16(), teacher.bfloat16()
    d = uniopd_advantages(sb, tb, loss_mask, cu, group_ids, correct)
    e = uniopd_advantages(sb.float(), tb.float(), loss_mask, cu, group_ids, correct)
    assert torch.equal(d.advantages, e.advantages) and torch.equal(d.returns, e.returns)


def test_edge_cases():
    empty_f = torch.zeros(0, device=DEVICE)
    cu0 = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    none = torch.zeros(0, dtype=torch.long, device=DEVICE)
    out = uniopd_advantages(empty_f, empty_f, empty_f.bool(), cu0, none, none.bool())
    assert out.advantages.shape == (0,) and out.returns.shape == (0,)
    assert (out.groups_checked, out.groups_violated, out.mean_shift) == (0, 0, 0.0)
    # sequences that are all empty: returns 0, a mixed group with gap 0 < margin is shifted
    cu = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    out = uniopd_advantages(empty_f, empty_f, empty_f.bool(), cu, torch.tensor([3, 3], device=DEVICE),
                            torch.tensor([True, False], device=DEVICE))  # fmt: skip
    assert out.returns.tolist() == [0.0, 0.0]
    assert out.shifts.tolist() == pytest.approx([0.2, -0.2])
    assert (out.groups_checked, out.groups_violated) == (1, 1) and out.mean_shift == pytest.approx(0.4)


def test_sparse_group_ids_are_compacted():
    student, teacher, loss_mask, cu, group_ids, correct = make_batch(seed=6)
    dense = uniopd_advantages(student, teacher, loss_mask, cu, group_ids, correct)
    sparse = uniopd_advantages(student, teacher, loss_mask, cu, group_ids * 1_000_003 + 17, correct)
    for name in FIELDS:
        x, y = getattr(dense, name), getattr(sparse, name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, name


def test_bad_arguments():
    batch = make_batch(seed=5, n_groups=2)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        uniopd_advantages(*batch, calibration="greedy_mask")
    for kw in (dict(statistic="median"), dict(direction="up"), dict(calibration="clip")):
        with pytest.raises(ValueError):
            uniopd_advantages(*batch, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: 1M tokens against the recipe on device")
@pytest.mark.gpu
def test_gpu_million_tokens_matches_recipe():
    recipe = pytest.importorskip("uniopd_mcore.recipe.advantages", reason="recipe torch function not written yet")
    gen = torch.Generator(device="cuda").manual_seed(0)
    n_seq, n_tok = 4096, 1 << 20
    cuts = torch.sort(torch.randint(0, n_tok + 1, (n_seq - 1,), device="cuda", generator=gen)).values
    cu = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), n_tok)]).int()
    student = -torch.rand(n_tok, device="cuda", generator=gen) * 4
    teacher = -torch.rand(n_tok, device="cuda", generator=gen) * 4
    loss_mask = torch.rand(n_tok, device="cuda", generator=gen) < 0.9
    group_ids = torch.arange(n_seq, device="cuda") // 16
    correct = torch.rand(n_seq, device="cuda", generator=gen) < 0.5
    for statistic in STATISTICS:
        args = (student, teacher, loss_mask, cu, group_ids, correct)
        ref = recipe.uniopd_advantages(*args, statistic=statistic, backend="torch")
        assert_same(uniopd_advantages(*args, statistic=statistic), ref, atol=1e-6)
