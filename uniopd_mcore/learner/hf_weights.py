"""Hugging Face safetensors <-> Megatron-Core GPTModel weights, at any TP/PP layout.

Decision: we use **mbridge** (PyPI `mbridge`, pure Python; it also needs `einops`, which its
package import pulls in). Checked on CPU with gloo against our portable spec (whose parameter
names are Transformer Engine's, which is what mbridge maps): Qwen3 loads and exports exactly at
TP=1, TP=2 and PP=2, tied and untied, and the logits match transformers to ~1e-7. mbridge
already does what we need and would otherwise re-write: QKV interleaved per query group,
fc1 = [gate; up] split per TP shard, vocabulary padding rows, tied embeddings, Qwen2's qkv bias,
and an export that walks the model one parameter at a time, broadcasting it from its pipeline
stage and all-gathering only that parameter's TP shards.

What this adapter adds on top of mbridge's `Bridge`:
  * it is used only for load/export (our model is built by `learner.model`), so the vocabulary
    sizes mbridge normally learns while building its own model are set here, with Megatron's
    padding rule (multiple of divisible_by * TP);
  * mbridge's tied-embedding switch edits a class-level mapping dict (so a tied model would
    change the mapping of every later untied one in the process): each bridge gets its own copy;
  * the export is detached, yields each HF name once (with tied embeddings and PP > 1 the last
    stage's output layer would repeat `model.embed_tokens.weight`) and can cast the dtype.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from uniopd_mcore.learner.model import ModelArch


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def make_bridge(
    hf_config: Any,
    arch: ModelArch,
    *,
    tp_size: int,
    dtype: torch.dtype = torch.float32,
    make_vocab_size_divisible_by: int = 128,
):
    """An mbridge Bridge for `hf_config`, bound to the current Megatron parallel state."""
    try:
        from mbridge import AutoBridge
    except ImportError as e:  # pragma: no cover - dependency hint
        raise ImportError("HF weight mapping needs `pip install mbridge einops`") from e

    bridge = AutoBridge.from_config(
        hf_config, dtype=dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by * tp_size
    )
    bridge.vocab_size = arch.vocab_size
    bridge.padded_vocab_size = arch.padded_vocab_size(tp_size, make_vocab_size_divisible_by)
    # per-instance copy of the direct mapping, with this model's own tying (see module docstring)
    direct = dict(type(bridge)._DIRECT_MAPPING)
    direct["output_layer.weight"] = (
        "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
    )
    bridge._DIRECT_MAPPING = direct
    return bridge


def load_hf_weights(model: torch.nn.Module, hf_dir: str, bridge) -> None:
    """Copy the safetensors of `hf_dir` into the local stage/shard of `model`."""
    with torch.no_grad():
        bridge.load_weights([_unwrap(model)], hf_dir)


def export_hf_weights(
    model: torch.nn.Module, bridge, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) one parameter at a time, vocabulary padding removed.

    Collective: every rank of the model-parallel group must drive the generator to the end
    (each step broadcasts over PP and all-gathers over TP); every rank receives every tensor.
    """
    seen: set[str] = set()
    source = bridge.export_weights([_unwrap(model)])
    while True:
        # no_grad around each step only: a `with` spanning the yields would leave grad mode
        # off in the consumer's code while the generator is suspended
        with torch.no_grad():
            try:
                name, tensor = next(source)
            except StopIteration:
                return
            if name in seen:
                continue
            seen.add(name)
            t = tensor.detach()
            t = t if dtype is None else t.to(dtype)
        yield name, t
