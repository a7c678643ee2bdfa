"""Megatron model from a Hugging Face config == transformers, on packed batches (float32, CPU).

Covers GQA, head_dim != hidden/heads, tied and untied embeddings, vocabulary padding (vocab 100),
TP=1 and TP=2, and the export round trip (HF -> Megatron -> HF is exact).
"""

from __future__ import annotations

import pytest
import torch

from _dist import run_distributed

LENGTHS = [7, 3, 12, 1, 5]  # different lengths, one single-token sequence


def _configs():
    from transformers import LlamaConfig, Qwen2Config

    from uniopd_mcore.learner.testing import tiny_qwen3_config

    common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return {
        "qwen3": tiny_qwen3_config(),
        "qwen3_tied": tiny_qwen3_config(tie_word_embeddings=True),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=False),  # qkv bias, no qk-norm
        "llama": LlamaConfig(**common, head_dim=16, tie_word_embeddings=False),
    }


def _worker(rank, world, hf_dir, tp, seqs):
    from transformers import AutoModelForCausalLM

    from uniopd_mcore.data.packing import pack_sequences
    from uniopd_mcore.learner import Learner, init_distributed
    from uniopd_mcore.learner.testing import hf_logits, hf_token_logprobs

    init_distributed(tp, 1)
    learner = Learner.from_hf(hf_dir)
    batch = pack_sequences(seqs)
    out = {"logits": learner.full_logits([batch])[0], "logprobs": learner.compute_logprobs([batch])[0]}
    exported = {}
    for name, tensor in learner.export_hf_weights():  # every rank drives the collective export
        exported[name] = tensor.clone()
    if rank == 0:
        # the references are computed here too, in a fresh process, not in the pytest process
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        out["ref_logits"] = torch.cat(hf_logits(model, seqs))
        out["ref_logprobs"] = torch.cat(hf_token_logprobs(model, seqs))
        state = model.state_dict()
        out["expected_names"] = set(state) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
        out["exported_names"] = set(exported)
        # export -> reload into a fresh HF model == the original state dict, exactly
        fresh = AutoModelForCausalLM.from_config(model.config).float()
        missing, unexpected = fresh.load_state_dict(exported, strict=False)
        out["reload_ok"] = not unexpected and set(missing) <= {"lm_head.weight"}
        out["reload_mismatch"] = [k for k, v in fresh.state_dict().items() if not torch.equal(v, state[k])]
    return out


@pytest.mark.parametrize(
    "name,tp",
    [("qwen3", 1), ("qwen3", 2), ("qwen3_tied", 1), ("qwen3_tied", 2), ("qwen2", 2), ("llama", 2)],
)
def test_parity_and_export(tmp_path, name, tp):
    from uniopd_mcore.learner.testing import make_tiny_hf_model, random_sequences

    config = _configs()[name]
    make_tiny_hf_model(str(tmp_path), config, seed=tp)
    seqs = random_sequences(LENGTHS, config.vocab_size, seed=7)
    results = run_distributed(_worker, tp, args=(str(tmp_path), tp, seqs))

    ref = results[0]
    starts = torch.tensor([0] + list(torch.tensor(LENGTHS).cumsum(0)[:-1]))
    for r in results:
        assert r["logits"].shape == ref["ref_logits"].shape  # vocabulary padding removed
        assert (r["logits"] - ref["ref_logits"]).abs().max() < 1e-3
        assert r["logprobs"].dtype == torch.float32
        torch.testing.assert_close(r["logprobs"], ref["ref_logprobs"], atol=1e-4, rtol=1e-4)
        assert (r["logprobs"][starts] == 0).all()
    assert ref["exported_names"] == ref["expected_names"]
    assert ref["reload_ok"] and ref["reload_mismatch"] == []


# ----------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): the same parity through the GPU code paths, in fresh spawned
# processes (a forked child cannot use CUDA once the parent has touched it).

def _gpu_worker(rank, world, hf_dir, seqs, backend, dtype):
    from uniopd_mcore.data.packing import pack_sequences
    from uniopd_mcore.learner import Learner, init_distributed

    init_distributed(1, 1)
    from transformers import AutoModelForCausalLM

    from uniopd_mcore.learner.testing import hf_token_logprobs

    learner = Learner.from_hf(hf_dir, backend=backend, params_dtype=dtype)
    batch = pack_sequences(seqs)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return {"logprobs": learner.compute_logprobs([batch])[0], "ref": torch.cat(hf_token_logprobs(model, seqs))}


@pytest.mark.gpu
@pytest.mark.parametrize(
    "backend,dtype,atol",
    [("portable", torch.float32, 1e-4), ("portable", torch.bfloat16, 0.15), ("te", torch.bfloat16, 0.15)],
)
def test_gpu_logprobs_match_hf(tmp_path, backend, dtype, atol):
    import importlib.util

    if backend == "te" and importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("transformer_engine not installed")
    from uniopd_mcore.learner.testing import make_tiny_hf_model, random_sequences

    make_tiny_hf_model(str(tmp_path), _configs()["qwen3"])
    seqs = random_sequences(LENGTHS, 100, seed=7)
    got = run_distributed(_gpu_worker, 1, args=(str(tmp_path), seqs, backend, dtype), start_method="spawn")[0]
    assert (got["logprobs"] - got["ref"]).abs().max() < atol
