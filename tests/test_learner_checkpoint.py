"""Distributed (Megatron dist-checkpointing) learner checkpoints: saved at one TP/PP/DP layout and
resumed at another, the next train step equals the uninterrupted run's; same layout stays exact;
unfinished (`.tmp`) saves are ignored."""

from __future__ import annotations

import json

import pytest
import torch

from _dist import run_distributed

OPTIM = dict(lr=5e-3, warmup_steps=3, weight_decay=0.1)
USER = {"step": 1, "sampler_cursor": 7, "note": "hello"}


def _batches():
    from uniopd_mcore.data.packing import pack_sequences
    from uniopd_mcore.learner.testing import random_sequences

    lengths = [6, 9, 4, 8, 5]
    seqs = random_sequences(lengths, 100, seed=11)
    masks = [[0.0] * 2 + [1.0] * (n - 2) for n in lengths]
    return [pack_sequences(seqs[:3], loss_mask=masks[:3]), pack_sequences(seqs[3:], loss_mask=masks[3:])]


def _weights(learner):
    return {k: v.clone() for k, v in learner.export_hf_weights()}  # collective: every rank


def _run(rank, world, hf_dir, tp, pp, save_to=None, load_from=(), extra=None):
    """Uninterrupted: step 1, (save), step 2. Then one fresh learner per `load_from` entry:
    load, step 2. Returns the step-2 metrics and weights of every learner."""
    import os

    from uniopd_mcore.learner import Learner, init_distributed

    init_distributed(tp, pp)
    kwargs = {**OPTIM, **(extra or {})}
    mbs = _batches()
    out = {}
    if save_to:
        a = Learner.from_hf(hf_dir, **kwargs)
        out["first"] = a.sft_step(mbs)
        if rank == 0:  # a stale unfinished save at the same path must not get in the way
            os.makedirs(save_to + ".tmp", exist_ok=True)
            open(os.path.join(save_to + ".tmp", "__0_0.distcp"), "w").write("garbage")
        a.save_checkpoint(save_to, user_state=USER)
        rng_after_save = torch.rand(4)
        out["uninterrupted"] = a.sft_step(mbs)
        out["uninterrupted_weights"] = _weights(a)
        out["rng_after_save"] = rng_after_save
    for path in load_from:
        b = Learner.from_hf(hf_dir, **kwargs)
        user = b.load_checkpoint(path)
        rng = torch.rand(4)
        metrics = b.sft_step(mbs)
        out[path] = {"user": user, "num_steps_loaded": b.num_steps - 1, "rng": rng, "next": metrics,
                     "weights": _weights(b)}
        b.load_checkpoint(path)  # loading again gives the same RNG stream (restored or reseeded)
        out[path]["rng_again"] = torch.rand(4)
    return out


def _same_step(resumed, reference, *, exact: bool):
    assert resumed["user"] == USER
    assert resumed["num_steps_loaded"] == 1
    got, ref = resumed["next"], reference["uninterrupted"]
    assert got["lr"] == ref["lr"]
    assert got["step"] == ref["step"] == 2.0
    if exact:
        assert got["loss"] == ref["loss"] and got["grad_norm"] == ref["grad_norm"]
    else:  # another TP layout: same maths, reductions in another order
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-7)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    w, w_ref = resumed["weights"], reference["uninterrupted_weights"]
    assert sorted(w) == sorted(w_ref)
    for k in w_ref:
        if exact:
            assert torch.equal(w[k], w_ref[k]), k
        else:
            torch.testing.assert_close(w[k], w_ref[k], atol=1e-6, rtol=1e-5, msg=k)
    assert torch.equal(resumed["rng"], resumed["rng_again"])  # deterministic either way


def test_tp2_to_tp1_and_tp1_to_tp2(hf_dir, tmp_path):
    from uniopd_mcore.learner.checkpoint import latest_checkpoint, read_info

    ck2, ck1 = str(tmp_path / "tp2" / "step_000001"), str(tmp_path / "tp1" / "step_000001")
    a = run_distributed(_run, 2, args=(hf_dir, 2, 1, ck2))  # TP=2: save, continue
    assert read_info(ck2)["layout"] == {"tp": 2, "pp": 1, "dp": 1, "world": 2}
    b = run_distributed(_run, 1, args=(hf_dir, 1, 1, ck1, [ck2]))[0]  # TP=1: save, continue; resume TP=2's
    c = run_distributed(_run, 2, args=(hf_dir, 2, 1, None, [ck1, ck2]))  # TP=2: resume TP=1's and its own

    # the uninterrupted runs agree with each other (TP changes rounding only)
    assert b["uninterrupted"]["loss"] == pytest.approx(a[0]["uninterrupted"]["loss"], rel=1e-6)
    _same_step(b[ck2], a[0], exact=False)  # TP=2 -> TP=1
    for r in c:
        _same_step(r[ck1], b, exact=False)  # TP=1 -> TP=2
        _same_step(r[ck2], a[0], exact=True)  # TP=2 -> TP=2: exact, RNG restored
    for rank in (0, 1):
        assert torch.equal(c[rank][ck2]["rng"], a[rank]["rng_after_save"])
    # no .tmp/.old left beside the finished checkpoints (the stale .tmp was replaced)
    assert sorted(p.name for p in (tmp_path / "tp2").iterdir()) == ["step_000001"]
    assert latest_checkpoint(tmp_path / "tp2") == tmp_path / "tp2" / "step_000001"


def test_pp2_to_pp1_tied_embeddings(tmp_path):
    from uniopd_mcore.learner.testing import make_tiny_hf_model, tiny_qwen3_config

    hf = str(tmp_path / "hf_tied")
    # tied embeddings: with PP=2 the last stage holds a copy of the embedding as output layer
    make_tiny_hf_model(hf, tiny_qwen3_config(tie_word_embeddings=True, num_hidden_layers=4))
    ck = str(tmp_path / "pp2" / "step_000001")
    d = run_distributed(_run, 2, args=(hf, 1, 2, ck, [ck]))  # PP=2: save, continue; resume at PP=2
    for r in d:
        _same_step(r[ck], d[0], exact=True)
    e = run_distributed(_run, 1, args=(hf, 1, 1, None, [ck]))[0]  # resume at PP=1
    _same_step(e[ck], d[0], exact=False)


def test_distributed_optimizer_dp2_to_tp2(hf_dir, tmp_path):
    ck = str(tmp_path / "dp2" / "step_000001")
    extra = {"distributed_optimizer": True}
    f = run_distributed(_run, 2, args=(hf_dir, 1, 1, ck, [], extra))  # DP=2, Adam state sharded over DP
    g = run_distributed(_run, 2, args=(hf_dir, 2, 1, None, [ck], extra))  # TP=2, DP=1
    for r in g:
        _same_step(r[ck], f[0], exact=False)


def _mismatch(rank, world, hf_dir, ck):
    from uniopd_mcore.learner import Learner, init_distributed

    init_distributed(1, 1)
    learner = Learner.from_hf(hf_dir, **OPTIM, distributed_optimizer=True)
    with pytest.raises(ValueError, match="distributed_optimizer"):
        learner.load_checkpoint(ck)
    user = learner.load_checkpoint(ck, load_optimizer=False)  # the model alone still loads
    return user, learner.num_steps


def test_unfinished_saves_are_ignored(hf_dir, tmp_path):
    from uniopd_mcore.learner.checkpoint import (
        MARKER,
        is_finished,
        latest_checkpoint,
        list_checkpoints,
        read_info,
    )

    root = tmp_path / "ckpt"
    good = root / "step_000001"
    run_distributed(_run, 1, args=(hf_dir, 1, 1, str(good)))
    # a run killed while writing step 2: files of a torch_dist save, no marker, still `.tmp`
    stale = root / "step_000002.tmp"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"partial")
    (stale / "metadata.json").write_text("{}")
    # a directory without the marker (e.g. copied by hand half-way) is not finished either
    (root / "step_000003").mkdir()
    assert list_checkpoints(root) == [good]
    assert latest_checkpoint(root) == good
    assert is_finished(good) and not is_finished(stale)
    with pytest.raises(FileNotFoundError, match="unfinished"):
        read_info(stale)
    with pytest.raises(FileNotFoundError, match=MARKER):
        read_info(root / "step_000003")
    info = json.loads((good / MARKER).read_text())
    assert info["num_steps"] == 1 and info["distributed_optimizer"] is False
    # the previous checkpoint is still usable; a different optimizer kind refuses the optimizer state
    user, steps = run_distributed(_mismatch, 1, args=(hf_dir, str(good)))[0]
    assert user == USER and steps == 1
