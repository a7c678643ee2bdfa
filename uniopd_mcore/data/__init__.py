"""Prompt data, balancing and packing."""

from uniopd_mcore.data.prompts import DataError
from uniopd_mcore.data.prompts import PromptRecord
from uniopd_mcore.data.prompts import load_prompts
from uniopd_mcore.data.prompts import render_prompt
from uniopd_mcore.data.prompts import write_jsonl

__all__ = ["DataError", "PromptRecord", "load_prompts", "render_prompt", "write_jsonl"]
