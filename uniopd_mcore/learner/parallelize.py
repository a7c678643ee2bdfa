"""Parallelism of the learner's GPTModel: one `apply_*` per technique, applied in this order.

Megatron-Core decides TP, SP, PP and recomputation when a module is *built* (from the
TransformerConfig), and DP when the built model is *wrapped*; so the first three edit the config
keyword arguments and the last wraps the model:

  1. apply_tensor_parallel           TP size; sequence parallelism (only meaningful with TP > 1)
  2. apply_pipeline_parallel         PP size; micro-batches of varying length exchange shapes
  3. apply_activation_checkpointing  full recomputation of every layer in the backward pass
     -- the model of this rank's pipeline stage is built here (model.build_gpt_model) --
  4. apply_data_parallel             Megatron DDP: fp32 main-grad buffers, gradients reduced over
                                     DP (and TP/PP-shared ones) in finalize_model_grads
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class ParallelConfig:
    tp_size: int = 1
    pp_size: int = 1
    sequence_parallel: bool = False
    recompute: bool = False
    distributed_optimizer: bool = False


def apply_tensor_parallel(kwargs: dict[str, Any], pc: ParallelConfig) -> None:
    kwargs["tensor_model_parallel_size"] = pc.tp_size
    # SP splits the LayerNorm/dropout regions along the sequence across TP ranks
    kwargs["sequence_parallel"] = pc.sequence_parallel and pc.tp_size > 1


def apply_pipeline_parallel(kwargs: dict[str, Any], pc: ParallelConfig) -> None:
    kwargs["pipeline_model_parallel_size"] = pc.pp_size
    # packed micro-batches have different lengths: p2p sends the shape before each tensor
    kwargs["variable_seq_lengths"] = True
    # irrelevant for dense models, but TransformerConfig rejects the default MoE dispatcher
    # ("allgather") together with variable_seq_lengths
    kwargs["moe_token_dispatcher_type"] = "alltoall"


def apply_activation_checkpointing(kwargs: dict[str, Any], pc: ParallelConfig) -> None:
    if pc.recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def apply_data_parallel(
    model: torch.nn.Module, config: TransformerConfig, pc: ParallelConfig
) -> DistributedDataParallel:
    """Wrap the stage model in Megatron's DDP and hook the gradient finalisation into the
    schedules (they call config.finalize_model_grads_func after the last backward)."""
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=pc.distributed_optimizer,
        ),
        module=model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp
