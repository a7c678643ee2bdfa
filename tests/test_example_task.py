"""The arithmetic example: character tokenizer, problem generation, JSONL, corruption, tiny model."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM

from examples.arithmetic import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SLICES,
    build_tokenizer,
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
from uniopd_mcore.rollout import EmbeddedRolloutEngine, SamplingParams


def integer_verifier(response: str, gold: str) -> bool:
    """Local stand-in for the "integer" verifier: the last integer in the response equals gold."""
    found = re.findall(r"-?\d+", response)
    return bool(found) and int(found[-1]) == int(gold)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    return out


def test_tokenizer_round_trip_through_auto_tokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    text = "37+48= 105-9*2"
    ids = tok(text).input_ids
    assert ids[0] == BOS_ID and len(ids) == len(text) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("85", add_special_tokens=False).input_ids + [EOS_ID]) == "85<eos>"
    assert len(set(tok("0123456789", add_special_tokens=False).input_ids)) == 10
    assert tok("x", add_special_tokens=False).input_ids == [tok.unk_token_id]
    # Same ids as the in-memory tokenizer.
    assert build_tokenizer()(text).input_ids == ids


def test_make_problems_is_deterministic_distinct_and_correct():
    problems = make_problems(500, seed=3)
    assert problems == make_problems(500, seed=3)
    assert problems != make_problems(500, seed=4)
    assert len({p.prompt for p in problems}) == 500
    for p in problems:
        assert re.fullmatch(r"\d{1,2}[+-]\d{1,2}=", p.prompt)
        assert int(p.answer) == eval(p.prompt[:-1]) >= 0
        assert p.source == "arith" and not p.corrupted
    ops = {p.op for p in problems}
    assert ops == {"add", "sub"}
    assert {p.op for p in make_problems(50, seed=0, kind="add")} == {"add"}
    three = make_problems(200, seed=0, min_digits=3, max_digits=3, kind="sub")
    assert all(100 <= p.a <= 999 and 100 <= p.b <= 999 and p.a >= p.b for p in three)
    assert {p.source for p in make_problems(50, seed=0, source=None)} == {"add", "sub"}


def test_exclude_gives_disjoint_sets_and_limits():
    train = make_problems(300, seed=0)
    test = make_problems(100, seed=1, exclude={p.prompt for p in train})
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    with pytest.raises(ValueError, match="distinct"):
        make_problems(1000, seed=0, kind="add", max_digits=1)  # only 100 exist
    with pytest.raises(ValueError, match="kind"):
        make_problems(1, seed=0, kind="div")


def test_jsonl_records(tmp_path):
    problems = make_problems(20, seed=0)
    path = tmp_path / "train.jsonl"
    assert write_jsonl(path, problems) == 20
    records = read_jsonl(path)
    assert records == [p.record() for p in problems]
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"prompt", "answer", "source"}


def test_corrupt_answers_on_the_slice_only():
    problems = make_problems(1000, seed=0)
    corrupted = corrupt_answers(problems, seed=0)
    on_slice = [first_operand_ends_in_7(p) for p in problems]
    assert 0.05 < sum(on_slice) / len(problems) < 0.2
    for clean, bad, hit in zip(problems, corrupted, on_slice):
        assert bad.prompt == clean.prompt and bad.corrupted == hit
        assert int(bad.answer) == int(clean.answer) + (10 if hit else 0)
    # Several offsets: drawn with the seed, always wrong.
    noisy = corrupt_answers(problems, lambda p: p.op == "add", seed=1, offsets=(-1, 1, 10))
    assert all((n.answer != p.answer) == (p.op == "add") for n, p in zip(noisy, problems))
    assert noisy == corrupt_answers(problems, lambda p: p.op == "add", seed=1, offsets=(-1, 1, 10))


def test_noisy_annotator_corrupts_a_fraction_of_the_slice_per_copy():
    problems = make_problems(1000, seed=0)
    data = noisy_annotator(problems, is_subtraction, rate=0.7, offset=1, copies=4, seed=3)
    assert len(data) == 4 * len(problems)
    copies = [data[k * len(problems):(k + 1) * len(problems)] for k in range(4)]
    for copy in copies:
        assert [p.prompt for p in copy] == [p.prompt for p in problems]
        for clean, noisy in zip(problems, copy):
            # only subtraction answers move, and only by the offset
            assert int(noisy.answer) - int(clean.answer) == (1 if noisy.corrupted else 0)
            assert not noisy.corrupted or clean.op == "sub"
        subs = [p for p in copy if p.op == "sub"]
        assert 0.6 < sum(p.corrupted for p in subs) / len(subs) < 0.8
    # each copy draws its own corruption, so a problem is usually but not always wrong
    assert copies[0] != copies[1]
    assert data == noisy_annotator(problems, is_subtraction, rate=0.7, offset=1, copies=4, seed=3)
    with pytest.raises(ValueError, match="rate"):
        corrupt_answers(problems, rate=1.5)


def test_ablation_slices():
    problems = make_problems(1000, seed=0)
    odd_sub = [p for p in problems if SLICES["odd_sub"](p)]
    assert odd_sub and all(p.op == "sub" and p.a % 2 == 1 for p in odd_sub)
    subs = [p for p in problems if p.op == "sub"]
    assert 0.35 < len(odd_sub) / len(subs) < 0.65  # about half of the subtractions
    assert SLICES["ends_in_7"] is first_operand_ends_in_7


def test_encode_problem_and_tiny_model_pipeline(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    problems = make_problems(6, seed=0)
    prompt_ids, response_ids = encode_problem(tok, problems[0])
    assert tok.decode(prompt_ids, skip_special_tokens=True) == problems[0].prompt
    assert response_ids[-1] == EOS_ID
    assert tok.decode(response_ids, skip_special_tokens=True) == problems[0].answer
    assert encode_problem(tok, problems[0].record()) == (prompt_ids, response_ids)

    config = tiny_qwen3_config(hidden=32, layers=2, heads=4, kv_heads=2)
    assert config.vocab_size >= len(tok) and config.eos_token_id == EOS_ID
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    engine = EmbeddedRolloutEngine(model)
    params = SamplingParams(temperature=1.0, max_new_tokens=4, stop_token_ids=(EOS_ID,))
    gens = engine.generate([encode_problem(tok, p)[0] for p in problems], params, seed=0)
    for p, g in zip(problems, gens):
        text = tok.decode(g.token_ids, skip_special_tokens=True)
        integer_verifier(text, p.answer)  # random model: just exercise the path
        assert (g.finish_reason == "stop") == (g.token_ids[-1] == EOS_ID)
    assert integer_verifier("85", "85") and integer_verifier("x 3 then 85", "85")
    assert not integer_verifier("58", "85") and not integer_verifier("", "85")
    with pytest.raises(ValueError):
        tiny_qwen3_config(vocab_size=8)
