"""The portable layer spec: TE parameter names, packed causal attention with GQA, HF norms."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from _dist import run_distributed

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def _config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                normalization="RMSNorm", layernorm_epsilon=1e-6, use_cpu_initialization=True,
                attention_dropout=0.0, hidden_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def test_block_causal_mask():
    from uniopd_mcore.learner.spec import block_causal_mask

    mask = block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)


def test_packed_attention_matches_per_sequence_gqa():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from uniopd_mcore.learner.spec import PackedAttention

    attn = PackedAttention(_config(), layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    lens = [4, 1, 6]
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(11, 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(11, 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(11, 2, 16, generator=g, dtype=torch.float64)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6)
    out = attn(q, k, v, None, packed_seq_params=params)
    assert out.shape == (11, 64)
    ref = []
    for s, n in zip([0, 4, 5], lens):
        qs, ks, vs = q[s : s + n], k[s : s + n].repeat_interleave(2, 1), v[s : s + n].repeat_interleave(2, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / 4.0
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        ref.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs).reshape(n, 64))
    torch.testing.assert_close(out, torch.cat(ref))


def test_norms_match_hf_rmsnorm():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from uniopd_mcore.learner.spec import Norm

    hf = Qwen3RMSNorm(32, eps=1e-6)
    ours = Norm(_config(), 32, eps=1e-6)
    with torch.no_grad():
        hf.weight.normal_()
        ours.weight.copy_(hf.weight)
    x = torch.randn(5, 3, 32)
    torch.testing.assert_close(ours(x), hf(x))


def test_backend_selection():
    from uniopd_mcore.learner.spec import resolve_backend

    assert resolve_backend("auto") == ("te" if HAVE_TE else "portable")
    assert resolve_backend("portable") == "portable"
    if not HAVE_TE:
        with pytest.raises(ImportError):
            resolve_backend("te")


def _names(rank, world, hf_dir):
    from uniopd_mcore.learner import Learner, init_distributed

    init_distributed(1, 1)
    return sorted(Learner.from_hf(hf_dir).module.state_dict())


def test_parameter_names_are_transformer_engine_names(tmp_path):
    from uniopd_mcore.learner.testing import make_tiny_hf_model

    make_tiny_hf_model(str(tmp_path))
    names = {n for n in run_distributed(_names, 1, args=(str(tmp_path),))[0] if not n.endswith("_extra_state")}
    layer = [
        "self_attention.linear_qkv.layer_norm_weight",
        "self_attention.linear_qkv.weight",
        "self_attention.q_layernorm.weight",
        "self_attention.k_layernorm.weight",
        "self_attention.linear_proj.weight",
        "mlp.linear_fc1.layer_norm_weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
    ]
    expected = {f"decoder.layers.{i}.{n}" for i in range(2) for n in layer}
    expected |= {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"}
    assert names == expected
