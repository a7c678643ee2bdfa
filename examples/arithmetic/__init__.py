"""The synthetic arithmetic task of the embedded CPU example (tokenizer, problems, tiny models)."""

from .task import (
    SLICES,
    Problem,
    corrupt_answers,
    encode_problem,
    first_operand_ends_in_7,
    is_subtraction,
    make_problems,
    noisy_annotator,
    read_jsonl,
    tiny_qwen3_config,
    write_jsonl,
)
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "Problem",
    "SLICES",
    "build_tokenizer",
    "corrupt_answers",
    "encode_problem",
    "first_operand_ends_in_7",
    "is_subtraction",
    "make_problems",
    "noisy_annotator",
    "read_jsonl",
    "tiny_qwen3_config",
    "write_jsonl",
]
