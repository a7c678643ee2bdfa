"""Megatron-Core GPTModel built from a Hugging Face config (Qwen3; Qwen2 and Llama share the path).

`ModelArch` is everything the learner needs to know about the checkpoint's architecture (HF
names and sizes, the padded vocabulary); `transformer_config()` turns it into Megatron's
`TransformerConfig`; `build_gpt_model()` builds the local pipeline stage; `packed_forward()` runs
one packed (THD) micro-batch, so RoPE positions restart at 0 for every sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_config import TransformerConfig

from uniopd_mcore.learner.parallelize import (
    ParallelConfig,
    apply_activation_checkpointing,
    apply_pipeline_parallel,
    apply_tensor_parallel,
)
from uniopd_mcore.learner.spec import Backend, get_layer_spec, resolve_backend

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")


@dataclass(frozen=True)
class ModelArch:
    """The architecture facts of a Hugging Face causal LM that the Megatron model needs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_layernorm: bool  # Qwen3: RMSNorm over each head of q and k
    qkv_bias: bool  # Qwen2: bias on q/k/v projections
    initializer_range: float = 0.02

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "ModelArch":
        model_type = getattr(cfg, "model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(f"model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {cfg.hidden_act!r}: only SwiGLU (silu) is mapped")
        if getattr(cfg, "use_sliding_window", False):
            raise NotImplementedError("sliding-window attention is not mapped")
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise NotImplementedError(f"rope_type {rope_type!r} is not mapped")
        # transformers >= 5 keeps theta in rope_parameters, older versions on the config
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        heads = cfg.num_attention_heads
        return cls(
            model_type=model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=float(theta),
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qk_layernorm=model_type == "qwen3",
            qkv_bias=model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            initializer_range=getattr(cfg, "initializer_range", 0.02),
        )

    def padded_vocab_size(self, tp_size: int, divisible_by: int = 128) -> int:
        """Megatron's rule: pad the vocabulary to a multiple of divisible_by * TP."""
        multiple = divisible_by * tp_size
        return -(-self.vocab_size // multiple) * multiple


def transformer_config(
    arch: ModelArch,
    parallel: ParallelConfig | None = None,
    *,
    params_dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> TransformerConfig:
    """TransformerConfig for `arch` and the parallel layout. Fusions that need apex, TE or CUDA
    are on only where those exist."""
    pc = parallel or ParallelConfig()
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,  # GQA
        kv_channels=arch.head_dim,  # may differ from hidden / heads (Qwen3)
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,  # SwiGLU: fc1 = [gate; up]
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not cuda,
        bias_activation_fusion=cuda,
        bias_dropout_fusion=cuda,
        masked_softmax_fusion=False,
        apply_rope_fusion=resolve_backend("auto") == "te",
        gradient_accumulation_fusion=False,  # needs apex's fused_weight_gradient_mlp_cuda
        persist_layer_norm=False,
    )
    apply_tensor_parallel(kwargs, pc)
    apply_pipeline_parallel(kwargs, pc)
    apply_activation_checkpointing(kwargs, pc)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(
    arch: ModelArch,
    config: TransformerConfig,
    *,
    backend: Backend = "auto",
    make_vocab_size_divisible_by: int = 128,
    vp_stage: int | None = None,
) -> GPTModel:
    """The GPTModel chunk of this pipeline rank (embedding on the first, head on the last)."""
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_layer_spec(config, backend, vp_stage=vp_stage),
        vocab_size=arch.padded_vocab_size(config.tensor_model_parallel_size, make_vocab_size_divisible_by),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        parallel_output=True,  # keep logits vocab-parallel: log-probs never gather the vocab
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedSeqParams:
    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=int(max_seqlen),
        max_seqlen_kv=int(max_seqlen),
    )


def pad_packed(
    input_ids: torch.Tensor, cu_seqlens: torch.Tensor, multiple: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Append one dummy sequence so that T is a multiple of `multiple` (sequence parallelism).
    Returns (input_ids, cu_seqlens, number of padding tokens)."""
    total = input_ids.numel()
    pad = (-total) % multiple
    if pad == 0:
        return input_ids, cu_seqlens, 0
    ids = torch.cat([input_ids, input_ids.new_zeros(pad)])
    cu = torch.cat([cu_seqlens, cu_seqlens.new_tensor([total + pad])])
    return ids, cu, pad


def packed_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """One packed micro-batch through the (local stage of the) model.

    input_ids [T] long, cu_seqlens [N+1] int32. On the last pipeline stage returns the
    vocab-parallel logits [T, V_padded / TP]; on other stages the hidden states [T, 1, H] that
    the pipeline schedule sends on. With sequence parallelism T is padded internally to a
    multiple of TP and the padding is cut off again.
    """
    total = input_ids.numel()
    cfg = _unwrap(model).config
    multiple = cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1
    ids, cu, pad = pad_packed(input_ids, cu_seqlens, multiple)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    max_seqlen = max(max_seqlen, pad)  # RoPE tables must cover the padding sequence too
    out = model(
        input_ids=ids.unsqueeze(0),
        position_ids=None,
        attention_mask=None,
        packed_seq_params=packed_seq_params(cu, max_seqlen),
    )
    if _unwrap(model).post_process:
        return out[0, :total]  # [1, T, V/TP] -> [T, V/TP]
    return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model

