"""The embedded rollout engine against step-by-step Hugging Face computations (CPU, tiny models)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3ForCausalLM

from uniopd_mcore.learner.testing import response_logprobs, tiny_causal_lm
from uniopd_mcore.rollout import EmbeddedRolloutEngine, Generation, RolloutEngine, SamplingParams

VOCAB = 48
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]


def tiny_model(seed: int = 0, tie: bool = True) -> Qwen3ForCausalLM:
    # A large init spread makes the random model's distributions peaked and input-dependent, so
    # greedy paths differ between prompts and argmax ties are practically impossible.
    return tiny_causal_lm(seed, vocab_size=VOCAB, head_dim=8, max_position_embeddings=128,
                          initializer_range=0.3, tie_word_embeddings=tie)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_engine_satisfies_protocol(model):
    assert isinstance(EmbeddedRolloutEngine(model), RolloutEngine)


def test_seeded_sampling_is_reproducible(model):
    engine = EmbeddedRolloutEngine(model)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12)
    first = engine.generate(PROMPTS, params, seed=7)
    again = engine.generate(PROMPTS, params, seed=7)
    other = engine.generate(PROMPTS, params, seed=8)
    assert first == again
    assert [g.token_ids for g in first] != [g.token_ids for g in other]


def test_greedy_equals_stepwise_argmax(model):
    engine = EmbeddedRolloutEngine(model)
    gens = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10))
    for prompt, gen in zip(PROMPTS, gens):
        ids = list(prompt)
        for token, logprob in zip(gen.token_ids, gen.logprobs):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            assert token == int(logits.argmax())
            assert logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]), abs=1e-5)
            ids.append(token)
        assert len(gen.token_ids) == 10 and gen.finish_reason == "length"


def test_logprobs_are_raw_full_forward_values(model):
    # Sampling at T != 1 with top-p: the returned log-probs are still the raw T=1 model values.
    engine = EmbeddedRolloutEngine(model)
    gens = engine.generate(PROMPTS, SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=9), seed=3)
    for prompt, gen in zip(PROMPTS, gens):
        expected = response_logprobs(model, prompt, gen.token_ids)
        torch.testing.assert_close(torch.tensor(gen.logprobs, dtype=torch.float64), expected, atol=1e-5, rtol=0)


def test_left_padding_matches_one_prompt_at_a_time(model):
    engine = EmbeddedRolloutEngine(model)
    params = SamplingParams(temperature=0, max_new_tokens=8)
    batched = engine.generate(PROMPTS, params)
    for prompt, gen in zip(PROMPTS, batched):
        (alone,) = engine.generate([prompt], params)
        assert gen.token_ids == alone.token_ids
        assert gen.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    # Splitting the batch changes nothing under greedy decoding either.
    split = EmbeddedRolloutEngine(model, max_batch_size=3).generate(PROMPTS, params)
    assert [g.token_ids for g in split] == [g.token_ids for g in batched]


def test_stop_tokens_and_max_new_tokens(model):
    engine = EmbeddedRolloutEngine(model)
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    free = engine.generate(PROMPTS, greedy)
    # Stop on the third greedy token of prompt 1: that row ends there (stop token included),
    # rows that never emit it run to max_new_tokens.
    stop = free[1].token_ids[2]
    stopped = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=(stop,)))
    for f, s in zip(free, stopped):
        if stop in f.token_ids:
            cut = f.token_ids.index(stop) + 1
            assert s.token_ids == f.token_ids[:cut] and s.finish_reason == "stop"
            assert s.logprobs == pytest.approx(f.logprobs[:cut], abs=1e-6)
        else:
            assert s.token_ids == f.token_ids and s.finish_reason == "length"
    assert stopped[1].token_ids[-1] == stop and len(stopped[1].token_ids) <= 3

    short = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=3))
    assert all(len(g.token_ids) == 3 and g.finish_reason == "length" for g in short)
    assert engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=0)) == [Generation([], [], "length")] * 2
    assert engine.generate([], greedy) == []
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], greedy)


def test_generate_runs_in_inference_mode(model):
    engine = EmbeddedRolloutEngine(model)
    modes = []
    hook = model.register_forward_pre_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    try:
        engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=3), seed=0)
    finally:
        hook.remove()
    assert modes and all(modes)


@pytest.mark.parametrize("tie", [True, False])
def test_update_weights_streams_hf_named_tensors(tie):
    engine = EmbeddedRolloutEngine(tiny_model(seed=0, tie=tie))
    source = tiny_model(seed=1, tie=tie)
    reference = EmbeddedRolloutEngine(tiny_model(seed=1, tie=tie))
    params = SamplingParams(temperature=0, max_new_tokens=8)
    before = engine.generate(PROMPTS, params)
    assert before != reference.generate(PROMPTS, params)

    # A generator, so tensors arrive one at a time; named_parameters() omits the tied lm_head.
    engine.update_weights((name, p.detach().clone()) for name, p in source.named_parameters())
    assert engine.weight_version == 1
    expected = dict(source.named_parameters(remove_duplicate=False))
    got = engine.state_dict_for_check()
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name].detach()), name
    assert engine.generate(PROMPTS, params) == reference.generate(PROMPTS, params)

    # Sending both names of a tied pair is fine when they agree.
    engine.update_weights(list(expected.items()), weight_version=10)
    assert engine.weight_version == 10


def test_update_weights_errors_name_the_parameter():
    engine = EmbeddedRolloutEngine(tiny_model(seed=0))
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        engine.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="model.norm.weight"):
        engine.update_weights([("model.norm.weight", torch.zeros(7))])
    embed = engine.model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(ValueError, match="tied"):
        engine.update_weights([("model.embed_tokens.weight", embed + 1), ("lm_head.weight", embed)])
    assert engine.weight_version == 0  # failed updates do not count


def test_release_and_resume_memory(model):
    engine = EmbeddedRolloutEngine(model)
    params = SamplingParams(temperature=0, max_new_tokens=5)
    before = engine.generate(PROMPTS, params)
    engine.release_memory()
    assert engine.released
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.generate(PROMPTS, params)
    engine.release_memory()  # idempotent
    engine.resume_memory()
    assert engine.generate(PROMPTS, params) == before


def test_loads_from_a_model_directory(tmp_path, model):
    model.save_pretrained(tmp_path)
    engine = EmbeddedRolloutEngine(tmp_path, dtype="float32")
    params = SamplingParams(temperature=0, max_new_tokens=6)
    assert engine.generate(PROMPTS, params) == EmbeddedRolloutEngine(model).generate(PROMPTS, params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_release_frees_weights():
    params = SamplingParams(temperature=0, max_new_tokens=8)
    on_cpu = EmbeddedRolloutEngine(tiny_model(seed=0)).generate(PROMPTS, params)
    engine = EmbeddedRolloutEngine(tiny_model(seed=0), device="cuda")
    on_gpu = engine.generate(PROMPTS, params)
    assert [g.token_ids for g in on_gpu] == [g.token_ids for g in on_cpu]
    for g, c in zip(on_gpu, on_cpu):
        assert g.logprobs == pytest.approx(c.logprobs, abs=1e-4)
    held = torch.cuda.memory_allocated()
    engine.release_memory()
    assert torch.cuda.memory_allocated() < held
    engine.update_weights([("model.norm.weight", torch.ones(32))])  # lands in the host copy
    engine.resume_memory()
    assert next(engine.model.parameters()).device.type == "cuda"
    assert engine.generate(PROMPTS[:1], SamplingParams(temperature=1.0, max_new_tokens=4), seed=0)
