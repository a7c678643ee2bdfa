"""Layer specs for the GPT decoder: Transformer Engine's when installed, a portable one otherwise.

The portable spec mirrors the *structure* of Megatron-Core's TE spec, so its parameter names are
TE's (`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`, ...): the
input/pre-MLP norms are fused into the following column-parallel linear, and the layer's own
`input_layernorm`/`pre_mlp_layernorm` slots stay `IdentityOp`. One checkpoint layout and one
Hugging Face mapping therefore serve both backends.

Pieces of the portable backend (`PortableSpecProvider`, a Megatron `BackendSpecProvider`):
  Norm                          RMSNorm/LayerNorm in float32 (Hugging Face numerics), TP/SP aware
  NormColumnParallelLinear      Norm + Megatron's ColumnParallelLinear, exposing layer_norm_weight
  PackedAttention               core attention over packed (THD) or padded (SBHD) sequences:
                                flash-attn varlen on CUDA when installed (lazy import), else torch
                                SDPA with a block-diagonal causal mask built from cu_seqlens.

`get_layer_spec(config, backend)` is the single place where the backend is chosen.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

Backend = Literal["auto", "te", "portable"]


def have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(backend: Backend = "auto") -> Literal["te", "portable"]:
    if backend == "auto":
        return "te" if have_te() else "portable"
    if backend == "te" and not have_te():
        raise ImportError("backend='te' needs transformer_engine (pip install uniopd-mcore[te])")
    return backend


# ----------------------------------------------------------------------------------------------
# Norms


def _rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    # float32 statistics whatever the activation dtype, as Hugging Face Qwen/Llama do.
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Norm(torch.nn.Module):
    """RMSNorm or LayerNorm following `config.normalization`, with Megatron's builder signature.

    Parameters are replicated over TP; under sequence parallelism every rank sees only its slice
    of the sequence, so the gradients are partial and get summed over TP by Megatron's
    `finalize_model_grads` (it looks for the `sequence_parallel` attribute set here).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.normalization = config.normalization
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        init = 0.0 if self.zero_centered_gamma else 1.0
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), init, dtype=config.params_dtype))
        self.bias = (
            torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            if self.normalization == "LayerNorm"
            else None
        )
        for p in self.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + 1 if self.zero_centered_gamma else self.weight
        if self.normalization == "RMSNorm":
            return w * _rms_norm(x, self.eps)
        return F.layer_norm(x.float(), x.shape[-1:], w.float(), self.bias.float(), self.eps).to(x.dtype)


class NormColumnParallelLinear(ColumnParallelLinear):
    """Norm followed by a column-parallel linear; the TE `LayerNormColumnParallelLinear` layout.

    The norm runs on the (possibly sequence-parallel) input before the linear gathers it, as TE
    does. Parameter names: `layer_norm_weight` (+ `layer_norm_bias` for LayerNorm), `weight`, `bias`.
    """

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.normalization = config.normalization
        self.eps = config.layernorm_epsilon
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        init = 0.0 if self.zero_centered_gamma else 1.0
        device = self.weight.device if self.weight is not None else None
        self.layer_norm_weight = torch.nn.Parameter(
            torch.full((input_size,), init, dtype=config.params_dtype, device=device)
        )
        self.layer_norm_bias = (
            torch.nn.Parameter(torch.zeros(input_size, dtype=config.params_dtype, device=device))
            if self.normalization == "LayerNorm"
            else None
        )
        for p in (self.layer_norm_weight, self.layer_norm_bias):
            if p is not None:
                setattr(p, "sequence_parallel", config.sequence_parallel)

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output=None):
        w = self.layer_norm_weight + 1 if self.zero_centered_gamma else self.layer_norm_weight
        if self.normalization == "RMSNorm":
            x = w * _rms_norm(input_, self.eps)
        else:
            x = F.layer_norm(
                input_.float(), input_.shape[-1:], w.float(), self.layer_norm_bias.float(), self.eps
            ).to(input_.dtype)
        return super().forward(x, weight=weight, runtime_gather_output=runtime_gather_output)


# ----------------------------------------------------------------------------------------------
# Core attention


def _flash_attn_varlen():
    """flash_attn_varlen_func when flash-attn is installed (GPU extra), else None."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T, T] bool, True where query i may attend key j: same packed sequence and j <= i."""
    pos = torch.arange(total, device=cu_seqlens.device)
    # segment id of every token, without a host sync: number of sequence ends at or before it
    seg = torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)
    return (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])


class PackedAttention(MegatronModule):
    """Causal core attention for Megatron's SelfAttention, with GQA and packed sequences.

    Inputs as Megatron hands them over: THD `q [T, np, hn]`, `k, v [T, ng, hn]` with
    `packed_seq_params.cu_seqlens_q`; or SBHD `[s, b, n, hn]` without. Returns `[T, np*hn]` /
    `[s, b, np*hn]`.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("context parallelism needs the Transformer Engine backend")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise NotImplementedError(f"PackedAttention is causal only, got {attn_mask_type}")
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        assert attention_bias is None, "attention_bias is not supported"
        dropout_p = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._thd(query, key, value, packed_seq_params, dropout_p)
        # SBHD: [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None if attention_mask is None else ~attention_mask  # Megatron: True = masked out
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None,
            scale=self.softmax_scale, enable_gqa=q.size(1) != k.size(1),
        )
        s, b = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _thd(self, q, k, v, params: PackedSeqParams, dropout_p: float) -> torch.Tensor:
        total = q.size(0)
        cu = params.cu_seqlens_q
        if params.cu_seqlens_q_padded is not None and not torch.equal(params.cu_seqlens_q_padded, cu):
            raise NotImplementedError("padded THD sequences are not supported by PackedAttention")
        flash = _flash_attn_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
        if flash is not None:
            out = flash(
                q, k, v, cu, cu, params.max_seqlen_q, params.max_seqlen_kv,
                dropout_p=dropout_p, softmax_scale=self.softmax_scale, causal=True,
            )
            return out.reshape(total, -1)
        # CPU/test path: scatter the packed tokens into a right-padded [N, L, n, hn] batch and run
        # plain causal SDPA. Costs N*L^2 instead of the T^2 of a block-diagonal [T, T] mask, which
        # matters for many short sequences; pads sit after every real key, so the causal mask
        # alone keeps them out of the real rows, and padded rows are dropped on the way back.
        lens = (cu[1:] - cu[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(lens.numel(), device=q.device), lens)
        pos = torch.arange(total, device=q.device) - cu[:-1].long()[seq]
        width = int(params.max_seqlen_q) if params.max_seqlen_q else int(lens.max())

        def padded(t: torch.Tensor) -> torch.Tensor:  # [T, n, hn] -> [N, n, L, hn]
            out = t.new_zeros(lens.numel(), width, t.size(1), t.size(2))
            out[seq, pos] = t
            return out.transpose(1, 2)

        qb, kb, vb = padded(q), padded(k), padded(v)
        out = F.scaled_dot_product_attention(
            qb, kb, vb, dropout_p=dropout_p, is_causal=True,
            scale=self.softmax_scale, enable_gqa=qb.size(1) != kb.size(1),
        )
        return out.transpose(1, 2)[seq, pos].reshape(total, -1)


# ----------------------------------------------------------------------------------------------
# Backend provider and specs


class PortableSpecProvider(LocalSpecProvider):
    """Megatron-Core modules + the fused-norm linear and packed attention above."""

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> type:
        return NormColumnParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return Norm

    def core_attention(self) -> type:
        return PackedAttention


def _layer_spec_for_backend(backend: BackendSpecProvider, qk_layernorm: bool) -> ModuleSpec:
    """Dense GPT layer with the TE layout: norms fused into linear_qkv and linear_fc1."""
    qk_norm = backend.layer_norm(for_qk=True) if qk_layernorm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_layer_norm_linear(),
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=get_mlp_module_spec_for_backend(backend=backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_portable_layer_spec(qk_layernorm: bool = True) -> ModuleSpec:
    return _layer_spec_for_backend(PortableSpecProvider(), qk_layernorm)


def get_layer_spec(
    config: TransformerConfig, backend: Backend = "auto", vp_stage: int | None = None
) -> ModuleSpec | TransformerBlockSubmodules:
    """What GPTModel takes as `transformer_layer_spec` for the local pipeline stage."""
    if resolve_backend(backend) == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    layer = get_portable_layer_spec(config.qk_layernorm)
    # A full block spec so that the final norm is ours too (Megatron's default is WrappedTorchNorm,
    # which refuses sequence parallelism).
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=Norm
    )


__all__ = [
    "Norm",
    "NormColumnParallelLinear",
    "PackedAttention",
    "PortableSpecProvider",
    "block_causal_mask",
    "get_layer_spec",
    "get_portable_layer_spec",
    "have_te",
    "resolve_backend",
]
