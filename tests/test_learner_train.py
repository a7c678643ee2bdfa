"""Optimizer steps: the loss goes down, warm-up follows the schedule, and a checkpoint round trip
(model + optimizer + scheduler + RNG + user state) reproduces the next step exactly."""

from __future__ import annotations

import pytest
import torch

from _dist import run_distributed


def _batches():
    from uniopd_mcore.data.packing import make_micro_batches, pack_sequences
    from uniopd_mcore.learner.testing import random_sequences

    lengths = [6, 9, 4, 8, 5, 7]
    seqs = random_sequences(lengths, 100, seed=11)
    prompt = 2  # the first two tokens are the prompt: no loss there
    batch = pack_sequences(seqs, loss_mask=[[0.0] * prompt + [1.0] * (n - prompt) for n in lengths])
    plan = make_micro_batches(lengths, max_tokens=16, dp_size=1)[0]
    return [batch.select(ids) for ids in plan]


def _train_worker(rank, world, hf_dir, tp):
    from uniopd_mcore.learner import Learner, init_distributed

    init_distributed(tp, 1)
    learner = Learner.from_hf(hf_dir, lr=1e-2, warmup_steps=2, weight_decay=0.1, betas=(0.9, 0.98))
    mbs = _batches()
    return [learner.sft_step(mbs) for _ in range(4)]


def _ckpt_worker(rank, world, hf_dir, ckpt_dir, tp, distributed_optimizer):
    from megatron.core import parallel_state

    from uniopd_mcore.learner import Learner, init_distributed

    init_distributed(tp, 1)
    kwargs = dict(lr=5e-3, warmup_steps=3, weight_decay=0.1, distributed_optimizer=distributed_optimizer)
    mbs = _batches()
    if parallel_state.get_data_parallel_world_size() > 1:  # different data on each DP rank
        mbs = mbs[parallel_state.get_data_parallel_rank() :: 2]
    a = Learner.from_hf(hf_dir, **kwargs)
    a.sft_step(mbs)
    a.save_checkpoint(ckpt_dir, user_state={"step": 1, "note": "hello"})
    a.save_checkpoint(ckpt_dir, user_state={"step": 1, "note": "hello"})  # overwrite is atomic too
    rng_a = torch.rand(4)  # the RNG stream right after the save...
    next_a = a.sft_step(mbs)
    weights_a = dict(a.export_hf_weights())

    b = Learner.from_hf(hf_dir, **kwargs)
    user = b.load_checkpoint(ckpt_dir)
    rng_b = torch.rand(4)  # ...continues right after the load
    next_b = b.sft_step(mbs)
    weights_b = dict(b.export_hf_weights())
    out = {"user": user, "next_a": next_a, "next_b": next_b, "same_rng": torch.equal(rng_a, rng_b),
           "same_weights": all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)}
    if distributed_optimizer:  # sharded Adam state == replicated Adam state
        c = Learner.from_hf(hf_dir, **{**kwargs, "distributed_optimizer": False})
        c.sft_step(mbs)
        c.sft_step(mbs)
        weights_c = dict(c.export_hf_weights())
        out["max_diff_vs_plain"] = max(float((weights_a[k] - weights_c[k]).abs().max()) for k in weights_a)
    return out


def test_sft_steps_lower_the_loss_with_warmup(hf_dir):
    steps = run_distributed(_train_worker, 1, args=(hf_dir, 1))[0]
    losses = [s["loss"] for s in steps]
    assert losses[1] < losses[0]  # one step on a fixed batch lowers its loss
    assert losses[-1] < losses[0]
    # lr of step k (0-based) is lr * (k + 1) / warmup, then constant
    assert [s["lr"] for s in steps] == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2])
    assert all(s["grad_norm"] > 0 and s["update_successful"] == 1.0 for s in steps)


@pytest.mark.parametrize("tp,distributed_optimizer", [(2, False), (1, True)], ids=["tp2", "dp2_distopt"])
def test_checkpoint_round_trip(hf_dir, tmp_path, tp, distributed_optimizer):
    results = run_distributed(_ckpt_worker, 2, args=(hf_dir, str(tmp_path / "ckpt"), tp, distributed_optimizer))
    for r in results:
        assert r["user"] == {"step": 1, "note": "hello"}
        assert r["next_b"]["loss"] == r["next_a"]["loss"]
        assert r["next_b"]["grad_norm"] == r["next_a"]["grad_norm"]
        assert r["next_b"]["lr"] == r["next_a"]["lr"]
        assert r["same_weights"]
        assert r["same_rng"]
        if distributed_optimizer:
            assert r["max_diff_vs_plain"] < 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .tmp/.old left behind
