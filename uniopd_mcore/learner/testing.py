"""Helpers for tests and examples: tiny random Hugging Face models and reference log-probs.

Nothing here downloads anything: models are built from a small config with random weights and
saved with `save_pretrained` (safetensors).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def tiny_qwen3_config(**overrides: Any):
    """2 layers, hidden 32, 4 heads / 2 KV heads, head_dim 16 (!= hidden/heads), vocab 100
    (not a multiple of 128, so Megatron pads it)."""
    from transformers import Qwen3Config

    kwargs: dict[str, Any] = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def make_tiny_hf_model(path: str, config: Any = None, *, seed: int = 0, std: float = 0.2):
    """Random float32 causal LM saved to `path`; returns the model (eval mode).

    Every weight is redrawn (norm weights around 1) so that a mis-mapped tensor changes the
    output: the default initialisation makes all norms exactly 1.
    """
    from transformers import AutoModelForCausalLM

    config = config or tiny_qwen3_config()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if "norm" in name else noise)
    model.save_pretrained(path)
    return model


def tiny_causal_lm(seed: int = 0, **config_overrides: Any):
    """A random tiny Qwen3 causal LM built in memory (eval mode), for tests that need no files."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(tiny_qwen3_config(**config_overrides)).eval()


def random_sequences(lengths: Sequence[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def hf_logits(model: Any, seqs: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Float32 logits [len, V] of every sequence, each run on its own (no packing)."""
    return [model(torch.tensor(s)[None]).logits[0].float() for s in seqs]


def hf_token_logprobs(model: Any, seqs: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Contract-aligned log p(x_t | x_<t) per sequence, 0 at t = 0, from log_softmax + gather."""
    out = []
    for s, logits in zip(seqs, hf_logits(model, seqs)):
        ids = torch.tensor(s)
        lp = torch.zeros(len(s))
        lp[1:] = logits[:-1].log_softmax(-1).gather(-1, ids[1:, None])[:, 0]
        out.append(lp)
    return out


def response_logprobs(model: Any, prompt: Sequence[int], response: Sequence[int]) -> torch.Tensor:
    """log p(response[t] | prompt, response[:t]) from one unpadded forward, in float64."""
    logits = hf_logits(model, [list(prompt) + list(response)])[0].double()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logp.gather(-1, torch.tensor(response, dtype=torch.long)[:, None]).squeeze(-1)


def export_hf_grads(learner: Any) -> dict[str, torch.Tensor]:
    """The gradients left in Megatron's main_grad buffers, under HF names, full (TP-gathered)
    tensors with the vocabulary padding removed: the HF export run on the grads instead of the
    weights. Collective, like the export."""
    params = [p for p in learner.module.parameters() if getattr(p, "main_grad", None) is not None]
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.main_grad.view_as(p.data)
        return {name: t.clone() for name, t in learner.export_hf_weights()}
    finally:
        for p, data in zip(params, saved):
            p.data = data
