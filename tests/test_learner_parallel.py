"""TP=2 (with and without sequence parallelism), PP=2 (1F1B) and DP=2 give the same log-probs,
logits, loss and gradients as one process, on CPU with gloo."""

from __future__ import annotations

import pytest
import torch

from _dist import run_distributed

LENGTHS = [5, 9, 3, 7, 6, 3]  # the last micro-batch has an odd length: SP pads it
MICRO = [[0, 1], [2, 3], [4, 5]]  # three micro-batches: 1F1B has a steady state with PP=2


def _weighted_logprob_loss(logprobs, batch):
    # depends on every token's log-prob, normalised by the global number of sequences
    loss = -(logprobs * batch["weight"] * batch["loss_mask"]).sum() / len(LENGTHS)
    return loss, {"mean_lp": logprobs.detach().mean()}


def _batches(micro):
    from uniopd_mcore.data.packing import pack_sequences
    from uniopd_mcore.learner.testing import random_sequences

    seqs = random_sequences(LENGTHS, 100, seed=3)
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(n, generator=g) for n in LENGTHS]
    masks = [[0.0] + [1.0] * (n - 1) for n in LENGTHS]
    return [
        pack_sequences([seqs[i] for i in ids], loss_mask=[masks[i] for i in ids], weight=[weights[i] for i in ids])
        for ids in micro
    ]


def _worker(rank, world, hf_dir, tp, pp, sp, micro_per_dp_rank, extra=None):
    from megatron.core import parallel_state

    from uniopd_mcore.learner import Learner, init_distributed
    from uniopd_mcore.learner.testing import export_hf_grads

    init_distributed(tp, pp)
    learner = Learner.from_hf(hf_dir, lr=0.0, clip_grad=0.0, sequence_parallel=sp, **(extra or {}))
    mbs = _batches(micro_per_dp_rank[parallel_state.get_data_parallel_rank()])
    logprobs = learner.compute_logprobs(mbs)
    logits = learner.full_logits(mbs)
    metrics = learner.train_step(mbs, _weighted_logprob_loss)
    grads = export_hf_grads(learner)
    return {"logprobs": logprobs, "logits": logits, "metrics": metrics, "grads": grads}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from uniopd_mcore.learner.testing import make_tiny_hf_model, tiny_qwen3_config

    path = str(tmp_path_factory.mktemp("tiny_qwen3_tied"))
    # tied embeddings: the PP run must sum the embedding grads of the first and last stage
    make_tiny_hf_model(path, tiny_qwen3_config(tie_word_embeddings=True, num_hidden_layers=4))
    return path


@pytest.fixture(scope="module")
def reference(hf_dir):
    return run_distributed(_worker, 1, args=(hf_dir, 1, 1, False, [MICRO]))[0]


def _check_grads(got, ref, atol=1e-5):
    assert sorted(got) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=atol, rtol=1e-4, msg=name)
    assert max(float(g.abs().max()) for g in ref.values()) > 0


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_equals_tp1(hf_dir, reference, sp):
    results = run_distributed(_worker, 2, args=(hf_dir, 2, 1, sp, [MICRO]))
    for r in results:  # every TP rank sees the same full values
        for a, b in zip(r["logprobs"], reference["logprobs"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for a, b in zip(r["logits"], reference["logits"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert r["metrics"]["loss"] == pytest.approx(reference["metrics"]["loss"], rel=1e-5)
        _check_grads(r["grads"], reference["grads"])


def test_pp2_equals_pp1(hf_dir, reference):
    results = run_distributed(_worker, 2, args=(hf_dir, 1, 2, False, [MICRO]))
    assert results[0]["logits"] is None  # first stage has no head
    for a, b in zip(results[1]["logits"], reference["logits"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for r in results:  # log-probs and metrics are broadcast to every stage
        for a, b in zip(r["logprobs"], reference["logprobs"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert r["metrics"]["loss"] == pytest.approx(reference["metrics"]["loss"], rel=1e-5)
        _check_grads(r["grads"], reference["grads"])


def test_dp2_sums_like_one_process(hf_dir, reference):
    # rank 0 gets micro-batches 0 and 2, rank 1 gets micro-batch 1: the objective is the sum
    results = run_distributed(_worker, 2, args=(hf_dir, 1, 1, False, [[MICRO[0], MICRO[2]], [MICRO[1]]]))
    for r in results:
        assert r["metrics"]["loss"] == pytest.approx(reference["metrics"]["loss"], rel=1e-5)
        _check_grads(r["grads"], reference["grads"])


def test_full_recompute_same_grads(hf_dir, reference):
    result = run_distributed(_worker, 1, args=(hf_dir, 1, 1, False, [MICRO], {"recompute": True}))[0]
    assert result["metrics"]["loss"] == pytest.approx(reference["metrics"]["loss"], rel=1e-6)
    _check_grads(result["grads"], reference["grads"])


def _hf_autograd(rank, world, hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    total = 0.0
    for batch in _batches(MICRO):
        cu = batch.cu_seqlens.tolist()
        parts = []
        for s, e in zip(cu[:-1], cu[1:]):
            ids = batch.input_ids[s:e]
            lp = model(ids[None]).logits[0].log_softmax(-1)[:-1].gather(-1, ids[1:, None])[:, 0]
            parts.append(torch.cat([lp.new_zeros(1), lp]))
        loss, _ = _weighted_logprob_loss(torch.cat(parts), batch)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad for n, p in model.named_parameters()}


def test_reference_matches_hf_autograd(hf_dir, reference):
    """The one-process loss and gradients equal transformers' autograd on the same objective
    (computed in its own process too, away from whatever the pytest process has loaded)."""
    total, hf_grads = run_distributed(_hf_autograd, 1, args=(hf_dir,))[0]
    assert reference["metrics"]["loss"] == pytest.approx(total, rel=1e-5)
    assert "lm_head.weight" not in reference["grads"]  # tied: one tensor, exported once
    _check_grads(reference["grads"], {n: hf_grads[n] for n in reference["grads"]})


def _fail_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("rank one is broken")
    return rank


def test_launcher_reports_failing_rank():
    # the shared launcher (learner.parallel.run_local_processes) returns the failing rank's traceback
    with pytest.raises(RuntimeError, match=r"(?s)--- rank 1 ---.*ValueError: rank one is broken"):
        run_distributed(_fail_on_rank_1, 2)
