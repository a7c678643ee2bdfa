"""Embedded teacher: log-probs of given response tokens from an in-process Hugging Face model."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from uniopd_mcore.rollout.embedded import load_causal_lm, pad_batch, pad_token_id
from uniopd_mcore.teachers.base import TEACHER_FAILED


def _index(values: list[int], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def pack_by_tokens(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Group indices into batches whose padded size (rows x longest row) fits the budget.

    Longest first, so rows of similar length share a batch and padding stays small; a single
    row longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        # Sorted descending, so the batch's first row is its longest.
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class EmbeddedTeacher:
    """TeacherScorer: one teacher-forced forward over prompt + response per sequence."""

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        max_batch_tokens: int = 8192,
    ) -> None:
        self.device = torch.device(device)
        self.model = load_causal_lm(model, self.device, dtype)
        self.max_batch_tokens = max_batch_tokens
        self._pad_id = pad_token_id(self.model)

    @torch.inference_mode()
    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[Tensor]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        results: list[Tensor] = [torch.empty(0, dtype=torch.float32) for _ in responses]
        todo = [i for i, r in enumerate(responses) if len(r) > 0]
        lengths = [len(prompts[i]) + len(responses[i]) for i in todo]
        for batch in pack_by_tokens(lengths, self.max_batch_tokens):
            rows = [todo[j] for j in batch]
            for i, lp in zip(rows, self._score_batch([prompts[i] for i in rows], [responses[i] for i in rows])):
                results[i] = lp
        return results

    def _score_batch(self, prompts: list[list[int]], responses: list[list[int]]) -> list[Tensor]:
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        # Right padding: positions 0..len-1 are the natural ones, pads sit after every real token
        # and so cannot influence it under the causal mask.
        input_ids, attention_mask = pad_batch(seqs, self._pad_id, left=False)
        position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            use_cache=False,
        ).logits  # [B, L, V]

        # Logits at position t predict token t+1: gather only the rows that predict response
        # tokens, so the float32 log-softmax is over [response tokens, V], not [B, L, V].
        row_idx, col_idx, targets = [], [], []
        for row, (p, r) in enumerate(zip(prompts, responses)):
            first = max(len(p), 1)  # token 0 has no context to be predicted from
            row_idx += [row] * (len(p) + len(r) - first)
            col_idx += range(first - 1, len(p) + len(r) - 1)
            targets += seqs[row][first:]
        dev = logits.device
        picked = logits[_index(row_idx, dev), _index(col_idx, dev)].float()
        flat = torch.log_softmax(picked, dim=-1).gather(-1, _index(targets, dev)[:, None])
        flat = flat.squeeze(-1).cpu()

        out, offset = [], 0
        for p, r in zip(prompts, responses):
            n = len(p) + len(r) - max(len(p), 1)
            lp = flat[offset : offset + n]
            offset += n
            if len(p) == 0:  # the first response token has no prompt to condition on
                lp = torch.cat([torch.tensor([TEACHER_FAILED]), lp])
            out.append(lp)
        return out
