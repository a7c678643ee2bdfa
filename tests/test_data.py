"""Prompt loading: JSONL / Parquet, chat messages, and messages that name file, row and field."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uniopd_mcore.data import DataError, PromptRecord, load_prompts, render_prompt, write_jsonl

SOURCES = {"math": None, "code": None}


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_jsonl_good(tmp_path):
    path = _jsonl(tmp_path / "train.jsonl", [
        {"prompt": "What is 2+3?", "answer": "5", "source": "math", "id": 7},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
         "answer": 2, "source": "code"},
        {"prompt": "Half of one?", "answer": 0.5, "source": "math"},
        {"prompt": "Three?", "answer": 3.0, "source": "math"},
    ])
    records = load_prompts([path], SOURCES)
    assert [r.index for r in records] == [0, 1, 2, 3]
    assert records[0] == PromptRecord("What is 2+3?", "5", "math", 0, {"id": 7})
    assert records[1].prompt[1] == {"role": "user", "content": "1+1?"} and records[1].answer == "2"
    assert records[2].answer == "0.5" and records[3].answer == "3"


def test_parquet_good_and_indices_span_files(tmp_path):
    table = pa.table({
        "prompt": [[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "3+3?"}]],
        "answer": ["4", "6"],
        "source": ["math", "math"],
        "level": [1, 2],
    })
    pq.write_table(table, tmp_path / "a.parquet")
    jsonl = _jsonl(tmp_path / "b.jsonl", [{"prompt": "x", "answer": "1", "source": "code"}])
    records = load_prompts([tmp_path / "a.parquet", jsonl], ["math", "code"])
    assert [r.index for r in records] == [0, 1, 2]
    assert records[0].prompt == [{"role": "user", "content": "2+2?"}]
    assert records[1].metadata == {"level": 2} and records[2].source == "code"


def test_missing_source_defaults_to_the_only_one(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "answer": "a"}])
    assert load_prompts(path, {"arith": None})[0].source == "arith"
    with pytest.raises(DataError, match=r"t.jsonl row 1: field 'source' is missing "
                                        r"\(needed to pick one of data.sources: code, math\)"):
        load_prompts(path, SOURCES)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "source": "math"}, r"field 'answer' is missing"),
    ({"answer": "1", "source": "math"}, r"field 'prompt' is missing"),
    ({"prompt": 5, "answer": "1", "source": "math"},
     r"field 'prompt' must be a string or a list of \{role, content\} messages, got int"),
    ({"prompt": [{"role": "user"}], "answer": "1", "source": "math"}, r"field 'prompt' message 1 must be"),
    ({"prompt": "", "answer": "1", "source": "math"}, r"field 'prompt' is empty"),
    ({"prompt": "p", "answer": None, "source": "math"}, r"field 'answer' is null"),
    ({"prompt": "p", "answer": [1], "source": "math"}, r"field 'answer' must be a string or a number, got list"),
    ({"prompt": "p", "answer": True, "source": "math"}, r"field 'answer' must be a string or a number, got bool"),
    ({"prompt": "p", "answer": "1", "source": "chem"}, r"source 'chem' is not in data.sources \(known: code, math\)"),
    ({"prompt": "p", "answer": "1", "source": 3}, r"field 'source' must be a string, got int"),
    ([1, 2], r"expected a JSON object with fields prompt, answer, source, got list"),
    ('{"prompt": "p", "answer": ', r"invalid JSON \(Expecting value"),
])
def test_malformed_jsonl_rows(tmp_path, row, message):
    good = {"prompt": "ok", "answer": "1", "source": "math"}
    # row 2 is blank: JSONL rows are reported by line number
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + r" row 3: " + message):
        load_prompts([str(path)], SOURCES)


def test_all_errors_of_a_file_collected_up_to_a_cap(tmp_path):
    rows = [{"prompt": "p", "source": "math"}] * 30 + [{"prompt": "p", "answer": "1", "source": "chem"}]
    path = _jsonl(tmp_path / "many.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_prompts(path, SOURCES)
    text = str(info.value)
    assert text.count("field 'answer' is missing") == 20
    assert "many.jsonl: ... and 11 more problems in this file" in text
    other = _jsonl(tmp_path / "other.jsonl", [{"prompt": 1, "answer": "1", "source": "math"}])
    with pytest.raises(DataError) as info:
        load_prompts([_jsonl(tmp_path / "two.jsonl", rows[:2]), other], SOURCES)
    assert "two.jsonl row 1:" in str(info.value) and "two.jsonl row 2:" in str(info.value)
    assert "other.jsonl row 1: field 'prompt'" in str(info.value)


def test_malformed_parquet(tmp_path):
    pq.write_table(pa.table({"prompt": ["p", None, "q"], "answer": ["1", "2", None], "source": ["math"] * 3}),
                   tmp_path / "bad.parquet")
    with pytest.raises(DataError) as info:
        load_prompts([tmp_path / "bad.parquet"], SOURCES)
    text = str(info.value)
    assert ("bad.parquet row 2: field 'prompt' must be a string or a list of {role, content} messages, "
            "got null") in text
    assert "bad.parquet row 3: field 'answer' is null" in text
    pq.write_table(pa.table({"prompt": ["p"], "source": ["math"]}), tmp_path / "noanswer.parquet")
    with pytest.raises(DataError, match=r"noanswer.parquet: field 'answer' is missing "
                                        r"\(no such column; columns: prompt, source\)"):
        load_prompts([tmp_path / "noanswer.parquet"])


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        load_prompts([tmp_path / "nope.jsonl"])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x.csv: unsupported file type '.csv'"):
        load_prompts([tmp_path / "x.csv"])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl: contains no prompts"):
        load_prompts([tmp_path / "empty.jsonl"])
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"junk.parquet: cannot read parquet file"):
        load_prompts([tmp_path / "junk.parquet"])


def test_write_jsonl_roundtrip_is_atomic(tmp_path):
    records = [PromptRecord("p1", "1", "math", 0, {"id": 1}),
               PromptRecord([{"role": "user", "content": "é?"}], "2", "code", 1)]
    out = tmp_path / "out" / "balanced.jsonl"
    assert write_jsonl(records + [{"prompt": "p3", "answer": "3", "source": "math"}], out) == 3
    back = load_prompts(out, SOURCES)
    assert [(r.prompt, r.answer, r.source, r.metadata) for r in back[:2]] == [
        (r.prompt, r.answer, r.source, r.metadata) for r in records]
    assert sorted(p.name for p in out.parent.iterdir()) == ["balanced.jsonl"]  # no temp file left behind

    def broken():
        yield records[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(broken(), out)
    assert len(load_prompts(out, SOURCES)) == 3  # the old file is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["balanced.jsonl"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "what", "is", "2+3", "?", "nothink"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
                          "{% if enable_thinking is defined and not enable_thinking %}nothink{% endif %}")
    return fast


def test_render_prompt(tokenizer):
    vocab = tokenizer.get_vocab()
    chat = PromptRecord([{"role": "user", "content": "what is 2+3 ?"}], "5", "math")
    ids = render_prompt(chat, tokenizer)
    expected = ["<|im_start|>", "user", "what", "is", "2+3", "?", "<|im_end|>", "<|im_start|>", "assistant"]
    assert ids == [vocab[w] for w in expected]
    assert render_prompt(chat, tokenizer, {"enable_thinking": False})[-1] == vocab["nothink"]
    # plain strings are encoded as they are, never templated
    plain = PromptRecord("what is 2+3 ?", "5", "math")
    assert render_prompt(plain, tokenizer) == [vocab[w] for w in ["what", "is", "2+3", "?"]]
    tokenizer_without_template = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer, unk_token="<unk>")
    with pytest.raises(DataError, match="is a list of chat messages, but the tokenizer has no chat template"):
        render_prompt(chat, tokenizer_without_template)
