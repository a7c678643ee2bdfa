"""Embedded rollout engine: a Hugging Face causal LM generating in this process (CPU or one GPU).

It is the rollout engine of the CPU example and of the tests, and it receives weights through the
same HF-named export that feeds SGLang, so the weight-sync path is exercised on every machine.

Generation is a plain batched decode loop: prompts are left-padded so that every row's next token
sits in the last column, the model's KV cache (`past_key_values`) carries the context, and each row
stops on its own at a stop token or at `max_new_tokens`.

Log-probs: each returned log-prob is log p(token) under the model's *raw* distribution
(temperature 1, no top-p), whatever the sampling parameters. That is what SGLang reports for
input-token log-probs (no temperature scaling by default) and what the learner recomputes, so the
three numbers are comparable; a temperature-scaled value would not be.
"""

from __future__ import annotations

import gc
import os
from typing import Iterable

import torch
from torch import Tensor

from uniopd_mcore.rollout.base import FINISH_LENGTH, FINISH_STOP, Generation, SamplingParams


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def load_causal_lm(
    model: str | os.PathLike | torch.nn.Module,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> torch.nn.Module:
    """A causal LM in eval mode on `device`: loaded from a local HF directory, or the given module
    (moved in place).

    dtype None keeps a given module's dtype and loads a directory in float32 (the safe choice on
    CPU; pass "bfloat16" on a GPU).
    """
    dtype = resolve_dtype(dtype)
    if isinstance(model, torch.nn.Module):
        module = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    else:
        from transformers import AutoModelForCausalLM

        module = AutoModelForCausalLM.from_pretrained(os.fspath(model), dtype=dtype or torch.float32)
        module = module.to(device)
    module.eval()
    return module


def pad_token_id(model: torch.nn.Module) -> int:
    """The model's configured pad id, else 0: pad positions are masked out, so any valid id works."""
    pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if isinstance(pad, int) else 0


def pad_batch(seqs: list[list[int]], pad_id: int, *, left: bool) -> tuple[Tensor, Tensor]:
    """[B, W] input ids and attention mask of `seqs`, padded on the left or on the right."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        input_ids[row, cols] = torch.tensor(s, dtype=torch.long)
        attention_mask[row, cols] = 1
    return input_ids, attention_mask


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> Tensor:
    """[B, V] float32 logits -> [B] next ids by greedy / temperature / nucleus sampling."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass of the tokens ranked above it already reaches top_p; the
        # top-ranked token always survives (mass before it is 0).
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= params.top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
    # multinomial renormalises, so the truncated distribution needs no explicit division.
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class EmbeddedRolloutEngine:
    """RolloutEngine over an in-process Hugging Face causal LM."""

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = load_causal_lm(model, self.device, dtype)
        self.max_batch_size = max_batch_size
        self.weight_version = 0
        self._released = False
        self._pad_id = pad_token_id(self.model)

    # ---- generation -------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seed: int | None = None
    ) -> list[Generation]:
        """Sample one response per prompt.

        With a seed the result is reproducible for the same prompts, batch split and device
        (the draws of all rows come from one generator, so changing the batch changes samples).
        """
        if self._released:
            raise RuntimeError("generate() after release_memory(): call resume_memory() first")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: a causal LM needs at least one token")
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        step = self.max_batch_size or max(1, len(prompts))
        out: list[Generation] = []
        for start in range(0, len(prompts), step):
            out.extend(self._generate_batch(prompts[start : start + step], params, generator))
        return out

    def _forward_last(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache) -> Tensor:
        # logits_to_keep=1: only the last column goes through the LM head ([B, 1, V] not [B, L, V]).
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator
    ) -> list[Generation]:
        from transformers import DynamicCache

        batch, max_new = len(prompts), params.max_new_tokens
        if max_new == 0:
            return [Generation([], [], FINISH_LENGTH) for _ in prompts]
        dev = self.device
        # Left padding: the last column holds every row's last prompt token, so one decode step
        # appends one column for the whole batch.
        input_ids, attention_mask = pad_batch(prompts, self._pad_id, left=True)
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        # Positions count real tokens only, so a padded row sees the same RoPE phases as alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        next_pos = position_ids[:, -1:] + 1

        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=dev)
        tokens = torch.zeros((batch, max_new), dtype=torch.long, device=dev)
        logprobs = torch.zeros((batch, max_new), dtype=torch.float32, device=dev)
        lengths = torch.zeros(batch, dtype=torch.long, device=dev)
        stopped = torch.zeros(batch, dtype=torch.bool, device=dev)

        cache = DynamicCache(config=self.model.config)
        logits = self._forward_last(input_ids, attention_mask, position_ids, cache)
        for t in range(max_new):
            next_ids = sample_next(logits, params, generator)
            tokens[:, t] = next_ids
            logprobs[:, t] = torch.log_softmax(logits, dim=-1).gather(-1, next_ids[:, None]).squeeze(-1)
            # Rows that stopped earlier keep decoding (cheaper than reshaping the cache) but
            # their extra tokens are cut off by `lengths`.
            lengths += (~stopped).long()
            stopped |= torch.isin(next_ids, stop_ids)
            if t == max_new - 1 or bool(stopped.all()):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            logits = self._forward_last(next_ids[:, None], attention_mask, next_pos, cache)
            next_pos = next_pos + 1
        del cache

        tokens, logprobs = tokens.cpu(), logprobs.cpu()
        lengths_l, stopped_l = lengths.tolist(), stopped.tolist()
        return [
            Generation(
                token_ids=tokens[row, : lengths_l[row]].tolist(),
                logprobs=logprobs[row, : lengths_l[row]].tolist(),
                finish_reason=FINISH_STOP if stopped_l[row] else FINISH_LENGTH,
            )
            for row in range(batch)
        ]

    # ---- weights ----------------------------------------------------------------------------

    def update_weights(
        self, named_tensors: Iterable[tuple[str, Tensor]], weight_version: int | None = None
    ) -> None:
        """Copy (HF name, tensor) pairs into the model, one at a time as they stream in.

        Not atomic: an unknown name or a shape mismatch raises after the earlier tensors were
        copied, and the weight version is then left unchanged. Tied parameters (lm_head.weight
        sharing embed_tokens.weight) are one tensor: the sender may send either name or both, but
        both must then carry equal values.
        """
        params = dict(self.model.named_parameters(remove_duplicate=False))
        written: dict[int, str] = {}  # id(parameter) -> name it was written under in this update
        with torch.no_grad():
            for name, tensor in named_tensors:
                param = params.get(name)
                if param is None:
                    known = ", ".join(list(params)[:4])
                    raise KeyError(
                        f"update_weights: unknown parameter {name!r} "
                        f"(model has {len(params)} names, e.g. {known}, ...)"
                    )
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(
                        f"update_weights: shape mismatch for {name!r}: got {tuple(tensor.shape)}, "
                        f"model has {tuple(param.shape)}"
                    )
                alias = written.get(id(param))
                if alias is not None and alias != name:
                    if not torch.equal(param, tensor.to(device=param.device, dtype=param.dtype)):
                        raise ValueError(
                            f"update_weights: {name!r} is tied to {alias!r} but the two tensors differ"
                        )
                    continue
                param.copy_(tensor)  # copy_ converts device and dtype
                written[id(param)] = name
        self.weight_version = self.weight_version + 1 if weight_version is None else int(weight_version)

    def state_dict_for_check(self) -> dict[str, Tensor]:
        """CPU copies of every parameter by HF name (tied aliases included), for tests/checks."""
        return {
            name: p.detach().to("cpu", copy=True)
            for name, p in self.model.named_parameters(remove_duplicate=False)
        }

    # ---- memory -----------------------------------------------------------------------------

    @property
    def released(self) -> bool:
        return self._released

    def release_memory(self) -> None:
        """Free accelerator memory for the learner (colocated runs).

        The KV cache lives only inside generate(), so it is already gone; on a GPU the weights
        move to host memory (update_weights keeps working on that copy). On CPU there is nothing
        to hand back, so only the state is recorded and generate() refuses until resume.
        """
        if self._released:
            return
        if self.device.type != "cpu":
            self.model.to("cpu")
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._released = True

    def resume_memory(self) -> None:
        if not self._released:
            return
        if self.device.type != "cpu":
            self.model.to(self.device)
        self._released = False
