"""A character-level tokenizer for the arithmetic example, saved as a Hugging Face tokenizer.

Every character is one token, so "37+48=" is 6 tokens and the answer "85" is 2: a tiny model
sees digits directly instead of learning a BPE's arbitrary number chunks. It is a real
`tokenizers` model wrapped in `PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained(dir)`
loads it like any model's tokenizer and the trainer needs no special case.
"""

from __future__ import annotations

import os

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3, in this order
CHARACTERS = "0123456789+-*= "
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


def vocab() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}


def build_tokenizer(out_dir: str | os.PathLike | None = None):
    """The tokenizer as a `PreTrainedTokenizerFast`, saved to `out_dir` when given.

    Encoding a text prepends <bos> (a fixed first token gives the model an anchor at position 0);
    decoding concatenates characters without spaces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=vocab(), unk_token=UNK))
    # [\s\S] matches any single character, newline included: every character is its own word.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",  # generation batches are left-padded
    )
    if out_dir is not None:
        tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer
