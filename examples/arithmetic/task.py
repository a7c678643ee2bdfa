"""The synthetic task of the CPU example: integer addition and subtraction with checkable answers.

A problem is a prompt "37+48=" whose response is the answer digits "85" followed by <eos>; the
verifier is "integer" (the last integer in the response equals the gold answer).

Why this task: two-digit operands (the default) are small enough that a 2-layer, 128-wide
transformer learns them to high accuracy in a few CPU minutes, so a well-trained teacher is
cheap. The demo's student is the same model trained for as long, but on a noisy annotator's
answers (`noisy_annotator`: most subtraction answers off by one): it answers most subtractions
wrong while still giving the right digit real probability, so its own samples contain right
answers the teacher's per-token log-probs can reward. (An *undertrained* student does not work
here: its mistakes are near-ties that any further training at a small learning rate reshuffles,
and where it is confidently wrong the reverse-KL gradient vanishes; see the issue 3 notes.)
`corrupt_answers` with rate 1 builds the opposite teacher for the recipe ablation: one trained to
be confidently wrong on a known slice, which outcome-guided margin calibration must overrule.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, replace
from typing import Callable, Iterable

from .tokenizer import BOS_ID, CHARACTERS, EOS_ID, PAD_ID, SPECIAL_TOKENS

OPS = {"add": "+", "sub": "-"}
KINDS = {"add": ("add",), "sub": ("sub",), "addsub": ("add", "sub")}


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str  # "add" | "sub"
    answer: str  # gold answer as written in the response (may be corrupted, see below)
    source: str = "arith"
    corrupted: bool = False  # answer deliberately wrong (corrupt_answers)

    @property
    def prompt(self) -> str:
        return f"{self.a}{OPS[self.op]}{self.b}="

    @property
    def true_answer(self) -> str:
        return str(self.a + self.b if self.op == "add" else self.a - self.b)

    def record(self) -> dict[str, str]:
        """The JSONL record the trainer reads."""
        return {"prompt": self.prompt, "answer": self.answer, "source": self.source}


def _operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
    # Pick the digit count first, so short and long operands are equally common (uniform over
    # 0..99 would make one-digit operands rare).
    digits = rng.randint(min_digits, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def make_problems(
    n: int,
    seed: int,
    kind: str = "addsub",
    min_digits: int = 1,
    max_digits: int = 2,
    source: str | None = "arith",
    exclude: Iterable[str] = (),
) -> list[Problem]:
    """n distinct problems; subtraction keeps a >= b so answers are non-negative.

    source None uses the operation name ("add"/"sub") as the data source, which lets a
    multi-teacher example route additions and subtractions to different teachers. `exclude`
    holds prompts to avoid (e.g. the training set when drawing an evaluation set).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {sorted(KINDS)}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    rng = random.Random(seed)
    seen = set(exclude)
    problems: list[Problem] = []
    # Rejection sampling of duplicates; the bound stops a request for more problems than exist.
    for _ in range(100 * n + 1000):
        if len(problems) == n:
            break
        op = rng.choice(KINDS[kind])
        a, b = _operand(rng, min_digits, max_digits), _operand(rng, min_digits, max_digits)
        if op == "sub" and a < b:
            a, b = b, a
        problem = Problem(a=a, b=b, op=op, answer="", source=source or op)
        problem = replace(problem, answer=problem.true_answer)
        if problem.prompt in seen:
            continue
        seen.add(problem.prompt)
        problems.append(problem)
    if len(problems) < n:
        raise ValueError(f"only {len(problems)} distinct {kind} problems found, {n} requested")
    return problems


def first_operand_ends_in_7(problem: Problem) -> bool:
    """The default slice for the confidently-wrong teacher: about 10% of problems."""
    return problem.a % 10 == 7


def odd_subtraction(problem: Problem) -> bool:
    """Subtractions whose first operand is odd: half of the demo student's uncertain slice."""
    return problem.op == "sub" and problem.a % 2 == 1


SLICES: dict[str, Callable[[Problem], bool]] = {
    "ends_in_7": first_operand_ends_in_7,
    "odd_sub": odd_subtraction,
}


def is_subtraction(problem: Problem) -> bool:
    """The slice the demo's noisy annotator gets wrong: half of the problems."""
    return problem.op == "sub"


def corrupt_answers(
    problems: list[Problem],
    slice_fn: Callable[[Problem], bool] = first_operand_ends_in_7,
    seed: int = 0,
    offsets: tuple[int, ...] = (10,),
    rate: float = 1.0,
) -> list[Problem]:
    """Copies of `problems` whose answers on the slice are shifted by an offset (default +10).

    With rate 1, a fixed offset is a systematic rule a model trained on these answers learns with
    confidence, i.e. it is confidently wrong there rather than merely noisy; several offsets
    (drawn with `seed`) give a noisier wrong teacher. With rate < 1 only that fraction of the
    slice (drawn with `seed`) is corrupted: a noisy annotator. Several copies of a data set, each
    corrupted with its own seed, teach a model that the wrong answer is merely the more likely
    one, so it keeps some probability on the right answer.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    rng = random.Random(seed)
    out = []
    for p in problems:
        if slice_fn(p) and rng.random() < rate:
            wrong = int(p.true_answer) + rng.choice(offsets)
            out.append(replace(p, answer=str(wrong), corrupted=True))
        else:
            out.append(p)
    return out


def noisy_annotator(
    problems: list[Problem],
    slice_fn: Callable[[Problem], bool] = is_subtraction,
    rate: float = 0.7,
    offset: int = 1,
    copies: int = 4,
    seed: int = 0,
) -> list[Problem]:
    """The demo student's training data: `copies` copies of `problems`, each with its own draw of
    which slice answers are off by `offset` (a fraction `rate` of the slice).

    A model trained on it answers most of the slice wrong yet keeps roughly 1 - rate of its
    probability on the right answer, which is what on-policy distillation can act on: the student
    must still sample the right token now and then for the teacher to reward it (reverse KL
    cannot move a student that is confidently wrong; its gradient vanishes there).
    """
    return [p for k in range(copies)
            for p in corrupt_answers(problems, slice_fn, seed=seed + k, offsets=(offset,), rate=rate)]


def write_jsonl(path: str | os.PathLike, problems: Iterable[Problem]) -> int:
    """Write one {"prompt", "answer", "source"} record per line; returns the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p.record()) + "\n")
            count += 1
    return count


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_problem(tokenizer, problem: Problem | dict) -> tuple[list[int], list[int]]:
    """(prompt ids starting with <bos>, response ids = answer characters + <eos>)."""
    record = problem.record() if isinstance(problem, Problem) else problem
    prompt = tokenizer(record["prompt"]).input_ids
    response = tokenizer(record["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt, response


def tiny_qwen3_config(
    vocab_size: int = 32,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_position_embeddings: int = 64,
    tie_word_embeddings: bool = True,
    **overrides,
):
    """A small transformers.Qwen3Config for the example's teacher and student models.

    vocab_size 32 covers the 19-token character vocabulary, rounded up so that it divides by the
    tensor-parallel sizes the learner is tested with. Grouped-query attention (kv_heads < heads)
    and tied embeddings match the Qwen3-4B student layout, so the example exercises the same
    HF <-> Megatron weight mapping as the real run.
    """
    from transformers import Qwen3Config

    if vocab_size < len(SPECIAL_TOKENS) + len(CHARACTERS):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's vocabulary")
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"need hidden % heads == 0 and heads % kv_heads == 0 ({hidden}, {heads}, {kv_heads})")
    config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    config.update(overrides)
    return Qwen3Config(**config)


__all__ = [
    "Problem",
    "SLICES",
    "corrupt_answers",
    "encode_problem",
    "first_operand_ends_in_7",
    "is_subtraction",
    "make_problems",
    "noisy_annotator",
    "odd_subtraction",
    "read_jsonl",
    "tiny_qwen3_config",
    "write_jsonl",
]
