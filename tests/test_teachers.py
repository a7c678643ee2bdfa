"""Teacher scorers: embedded teacher vs manual log-softmax, routing, and the SGLang pool against
fake SGLang servers on 127.0.0.1 that answer /generate with log-probs of a tiny HF model."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import Qwen3ForCausalLM

from uniopd_mcore.learner.testing import response_logprobs, tiny_causal_lm
from uniopd_mcore.teachers import TEACHER_FAILED, EmbeddedTeacher, SGLangTeacher, TeacherRouter, TeacherScorer
from uniopd_mcore.teachers.embedded import pack_by_tokens

VOCAB = 40
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12], [13, 14, 15, 16, 17]]
RESPONSES = [[20, 21, 22, 23], [24], [25, 26, 27, 28, 29, 30, 31], [], [32, 33]]


def tiny_model(seed: int = 0) -> Qwen3ForCausalLM:
    return tiny_causal_lm(seed, vocab_size=VOCAB, head_dim=8, max_position_embeddings=64,
                          initializer_range=0.3, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# ---- embedded teacher ----------------------------------------------------------------------


@pytest.mark.parametrize("max_batch_tokens", [4, 24, 10_000])
def test_embedded_teacher_matches_manual_log_softmax(model, max_batch_tokens):
    teacher = EmbeddedTeacher(model, max_batch_tokens=max_batch_tokens)
    assert isinstance(teacher, TeacherScorer)
    scores = teacher.score(PROMPTS, RESPONSES)
    assert len(scores) == len(PROMPTS)
    for prompt, response, lp in zip(PROMPTS, RESPONSES, scores):
        assert lp.dtype == torch.float32 and lp.shape == (len(response),)
        if response:
            torch.testing.assert_close(lp.double(), response_logprobs(model, prompt, response), atol=1e-5, rtol=0)


def test_embedded_teacher_edge_cases(model):
    teacher = EmbeddedTeacher(model)
    assert teacher.score([], []) == []
    (only_empty,) = teacher.score([[1, 2]], [[]])
    assert only_empty.numel() == 0
    # No prompt: the first response token has no context, so it carries the sentinel.
    (lp,) = teacher.score([[]], [[3, 4, 5]])
    assert lp[0] == TEACHER_FAILED
    torch.testing.assert_close(lp[1:].double(), response_logprobs(model, [3], [4, 5]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        teacher.score([[1]], [])


def test_pack_by_tokens_respects_budget():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    batches = pack_by_tokens(lengths, 10)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 10


# ---- routing -------------------------------------------------------------------------------


class ConstantTeacher:
    """Scores every token with one constant and records its calls."""

    def __init__(self, value: float) -> None:
        self.value, self.calls = value, []

    def score(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        return [torch.full((len(r),), self.value) for r in responses]


def test_router_sends_each_source_to_its_teacher():
    math, code = ConstantTeacher(-1.0), ConstantTeacher(-2.0)
    router = TeacherRouter({"math-expert": math, "code-expert": code}, {"math": "math-expert", "code": "code-expert"})
    sources = ["math", "code", "math", "code", "math"]
    scores = router.score(PROMPTS, RESPONSES, sources)
    for source, response, lp in zip(sources, RESPONSES, scores):
        assert lp.shape == (len(response),)
        assert torch.all(lp == (-1.0 if source == "math" else -2.0))
    # One batched call per teacher, with its sequences in input order.
    assert math.calls == [([PROMPTS[0], PROMPTS[2], PROMPTS[4]], [RESPONSES[0], RESPONSES[2], RESPONSES[4]])]
    assert code.calls == [([PROMPTS[1], PROMPTS[3]], [RESPONSES[1], RESPONSES[3]])]


def test_router_unknown_source_and_default():
    math, general = ConstantTeacher(-1.0), ConstantTeacher(-3.0)
    strict = TeacherRouter({"m": math}, {"math": "m"})
    with pytest.raises(KeyError, match=r"'poetry'.*\['math'\]"):
        strict.score([[1]], [[2]], ["poetry"])
    assert math.calls == []  # failed before any teacher call
    lenient = TeacherRouter({"m": math, "g": general}, {"math": "m"}, default="g")
    scores = lenient.score([[1], [1]], [[2], [2, 3]], ["poetry", "math"])
    assert scores[0].tolist() == [-3.0] and scores[1].tolist() == [-1.0, -1.0]
    assert lenient.score([[1]], [[2]])[0].tolist() == [-3.0]  # no sources: the default teacher
    with pytest.raises(KeyError, match="nope"):
        TeacherRouter({"m": math}, {"math": "nope"})
    with pytest.raises(KeyError, match="nope"):
        TeacherRouter({"m": math}, {}, default="nope")


def test_router_over_embedded_teachers(model):
    other = tiny_model(seed=1)
    router = TeacherRouter({"a": EmbeddedTeacher(model), "b": EmbeddedTeacher(other)}, {"x": "a", "y": "b"})
    sources = ["y", "x", "y", "x", "x"]
    for prompt, response, source, lp in zip(PROMPTS, RESPONSES, sources, router.score(PROMPTS, RESPONSES, sources)):
        if response:
            expected = response_logprobs(model if source == "x" else other, prompt, response)
            torch.testing.assert_close(lp.double(), expected, atol=1e-5, rtol=0)


# ---- SGLang pool against fake servers ------------------------------------------------------


class FakeSGLang(ThreadingHTTPServer):
    """Answers POST /generate like SGLang's prefill-only scoring; `fail_first` requests get 503,
    `delay_first` requests sleep first (timeouts), `always_fail` makes every request a 500."""

    # Non-daemon handler threads: server_close() joins them, so a request still sleeping after
    # its client timed out finishes inside the test, not during interpreter shutdown.
    daemon_threads = False

    def __init__(self, model, fail_first=0, always_fail=False, delay_first=0, delay_s=0.0, wrong_ids=False):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.model, self.fail_first, self.always_fail = model, fail_first, always_fail
        self.delay_first, self.delay_s, self.wrong_ids = delay_first, delay_s, wrong_ids
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, payload: dict) -> dict:
        ids = payload["input_ids"]
        with self.lock, torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        entries = [[None, ids[0], None]]
        for t in range(1, len(ids)):
            token = ids[t] + 1 if self.wrong_ids else ids[t]
            entries.append([float(logp[t - 1, ids[t]]), token, None])
        return {"text": "", "meta_info": {"input_token_logprobs": entries, "prompt_tokens": len(ids)}}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def do_POST(self):
        server: FakeSGLang = self.server  # type: ignore[assignment]
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append(payload)
            n = len(server.requests)
        if n <= server.delay_first:
            time.sleep(server.delay_s)
        if self.path != "/generate" or server.always_fail or n <= server.fail_first:
            self.send_response(500 if server.always_fail else 503)
            self.end_headers()
            return
        body = json.dumps(server.answer(payload)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)


@pytest.fixture
def servers(model):
    started: list[FakeSGLang] = []

    def start(**kwargs) -> FakeSGLang:
        server = FakeSGLang(model, **kwargs)
        server.thread.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def assert_matches_model(model, scores, prompts=PROMPTS, responses=RESPONSES):
    for prompt, response, lp in zip(prompts, responses, scores):
        assert lp.dtype == torch.float32 and lp.shape == (len(response),)
        if response:
            torch.testing.assert_close(lp.double(), response_logprobs(model, prompt, response), atol=1e-5, rtol=0)


def test_sglang_round_robin_over_two_servers(model, servers):
    a, b = servers(), servers()
    teacher = SGLangTeacher([a.url, b.url + "/"], max_in_flight=2)
    assert isinstance(teacher, TeacherScorer)
    assert teacher.health() == {a.url: True, b.url: True}
    scores = teacher.score(PROMPTS, RESPONSES)
    assert_matches_model(model, scores)
    # 4 non-empty responses -> 4 requests, 2 per server; the empty response costs none.
    assert len(a.requests) == 2 and len(b.requests) == 2
    payload = a.requests[0]
    assert payload["sampling_params"] == {"temperature": 0, "max_new_tokens": 0}
    assert payload["return_logprob"] is True and payload["logprob_start_len"] == 0
    sent = sorted(tuple(p["input_ids"]) for p in a.requests + b.requests)
    assert sent == sorted(tuple(p + r) for p, r in zip(PROMPTS, RESPONSES) if r)
    assert teacher.counters["failed_sequences"] == 0 and teacher.counters["retries"] == 0


def test_sglang_retries_until_the_server_recovers(model, servers):
    flaky = servers(fail_first=3)
    teacher = SGLangTeacher([flaky.url], max_retries=5, backoff_s=0.01, max_in_flight=1)
    scores = teacher.score(PROMPTS[:1], RESPONSES[:1])
    assert_matches_model(model, scores, PROMPTS[:1], RESPONSES[:1])
    assert len(flaky.requests) == 4
    assert teacher.counters == {
        "requests": 4, "retries": 3, "failed_requests": 3, "sequences": 1, "failed_sequences": 0
    }


def test_sglang_retry_moves_to_the_next_server(model, servers):
    dead, good = servers(always_fail=True), servers()
    teacher = SGLangTeacher([dead.url, good.url], max_retries=2, backoff_s=0.01)
    scores = teacher.score(PROMPTS, RESPONSES)
    assert_matches_model(model, scores)
    assert teacher.counters["failed_sequences"] == 0 and len(dead.requests) >= 1


def test_sglang_all_attempts_fail_gives_sentinel(servers, caplog):
    dead = servers(always_fail=True)
    teacher = SGLangTeacher([dead.url], max_retries=2, backoff_s=0.01)
    with caplog.at_level(logging.WARNING, logger="uniopd_mcore.teachers.sglang"):
        scores = teacher.score(PROMPTS, RESPONSES)
    for response, lp in zip(RESPONSES, scores):
        assert lp.shape == (len(response),) and torch.all(lp == TEACHER_FAILED)
    assert len(dead.requests) == 4 * 3  # 4 non-empty responses x (1 + 2 retries)
    assert teacher.counters["failed_sequences"] == 4
    assert "500" in teacher.last_error
    assert sum("sentinel" in r.getMessage() for r in caplog.records) == 4


def test_sglang_timeout_and_unreachable_server(model, servers):
    slow = servers(delay_first=1, delay_s=1.0)
    teacher = SGLangTeacher([slow.url], max_retries=1, timeout_s=0.3, backoff_s=0.01)
    assert_matches_model(model, teacher.score(PROMPTS[:1], RESPONSES[:1]), PROMPTS[:1], RESPONSES[:1])
    assert teacher.counters["retries"] == 1

    closed = servers()
    url = closed.url
    closed.shutdown()
    closed.server_close()
    teacher = SGLangTeacher([url], max_retries=1, timeout_s=1.0, backoff_s=0.01)
    (lp,) = teacher.score([[1, 2]], [[3, 4]])
    assert torch.all(lp == TEACHER_FAILED)
    assert teacher.health() == {url: False}


def test_sglang_token_mismatch_is_not_retried(servers):
    wrong = servers(wrong_ids=True)
    teacher = SGLangTeacher([wrong.url], max_retries=3, backoff_s=0.01)
    (lp,) = teacher.score([[1, 2]], [[3, 4]])
    assert torch.all(lp == TEACHER_FAILED)
    assert len(wrong.requests) == 1 and "token" in teacher.last_error
