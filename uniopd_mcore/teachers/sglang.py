"""A teacher served by a pool of SGLang HTTP servers (reference/anchors.md section 8.1).

One request per sequence to `/generate` with the full token ids (prompt + response) and
`max_new_tokens = 0`: the server runs a prefill only and returns the log-prob of every input token.
Servers are used round-robin; a failed request is retried on the next server with exponential
backoff; a sequence whose attempts all fail comes back as the TEACHER_FAILED sentinel, so one bad
server degrades a step instead of stopping it (the recipe gives sentinel tokens no loss).

Only the standard library is used (urllib + threads): no client dependency on the learner side.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from uniopd_mcore.teachers.base import TEACHER_FAILED
from uniopd_mcore.utils.http import HTTPRequestError, RoundRobin, excerpt, request

logger = logging.getLogger(__name__)


class MalformedResponse(ValueError):
    """The server answered, but not with log-probs for our tokens (e.g. another tokenizer)."""


class SGLangTeacher:
    """TeacherScorer over SGLang servers, e.g. ["http://127.0.0.1:30000", "http://127.0.0.1:30001"]."""

    def __init__(
        self,
        servers: list[str],
        max_retries: int = 5,
        timeout_s: float = 45.0,
        max_in_flight: int = 64,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        api_key: str | None = None,
    ) -> None:
        """max_retries: attempts after the first one (so at most max_retries + 1 requests per
        sequence); backoff before retry k (k = 0, 1, ...) is min(max_backoff_s, backoff_s * 2^k)."""
        if not servers:
            raise ValueError("SGLangTeacher needs at least one server URL")
        self.servers = [s.rstrip("/") for s in servers]
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.api_key = api_key
        self._lock = threading.Lock()
        self._pool = RoundRobin(self.servers, max_retries=max_retries, backoff_s=backoff_s,
                                max_backoff_s=max_backoff_s)
        self.counters = {
            "requests": 0,  # HTTP requests sent
            "retries": 0,  # requests that were a retry of a failed one
            "failed_requests": 0,  # requests that errored (connection, timeout, HTTP error, bad body)
            "sequences": 0,  # sequences scored (empty responses included)
            "failed_sequences": 0,  # sequences returned as the sentinel: each one is a warning
        }
        self.last_error: str | None = None

    # ---- public -----------------------------------------------------------------------------

    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[Tensor]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        workers = max(1, min(self.max_in_flight, len(prompts)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sglang-teacher") as pool:
            futures = [pool.submit(self._score_one, p, r) for p, r in zip(prompts, responses)]
            return [f.result() for f in futures]

    def health(self) -> dict[str, bool]:
        """GET /health on every server (True when it answers 200)."""
        status = {}
        for server in self.servers:
            try:
                request(server + "/health", timeout=self.timeout_s)
                status[server] = True
            except HTTPRequestError:
                status[server] = False
        return status

    # ---- internals --------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def _score_one(self, prompt: list[int], response: list[int]) -> Tensor:
        self._count("sequences")
        if len(response) == 0:
            return torch.empty(0, dtype=torch.float32)
        payload = {
            "input_ids": [int(t) for t in prompt] + [int(t) for t in response],
            # A prefill only: the server generates nothing and returns input-token log-probs,
            # which SGLang computes at temperature 1 regardless of sampling temperature.
            "sampling_params": {"temperature": 0, "max_new_tokens": 0},
            "return_logprob": True,
            # 0 = log-probs for the whole input, as slime/miles/Uni-OPD send it. Starting near the
            # prompt end would let SGLang reuse the prompt's KV cache across a group's rollouts,
            # but the boundary index semantics are unverified, so keep the known-good value.
            "logprob_start_len": 0,
        }
        error = "no attempt made"
        for attempt, server in self._pool.attempts():
            if attempt > 0:
                self._count("retries")
            self._count("requests")
            try:
                answer = request(server + "/generate", payload, timeout=self.timeout_s, api_key=self.api_key)
                if not isinstance(answer, (dict, list)):
                    raise HTTPRequestError(server + "/generate", None, f"not JSON: {excerpt(str(answer))}")
                return parse_input_logprobs(answer, response)
            except HTTPRequestError as err:  # timeout, refused, cut off, HTTP error, bad JSON
                error = self._record_failure(server, f"HTTP {err.status}" if err.status else str(err.detail))
                if not err.retryable:
                    break
            except MalformedResponse as err:
                error = self._record_failure(server, str(err))
                break  # deterministic: the same request gets the same wrong answer
        self._count("failed_sequences")
        logger.warning(
            "teacher scoring failed for a sequence of %d response tokens after retries (%s); "
            "using the %.0f sentinel",
            len(response),
            error,
            TEACHER_FAILED,
        )
        return torch.full((len(response),), TEACHER_FAILED, dtype=torch.float32)

    def _record_failure(self, server: str, what: str) -> str:
        error = f"{server}: {what}"
        with self._lock:
            self.counters["failed_requests"] += 1
            self.last_error = error
        return error


def parse_input_logprobs(body: dict | list, response: list[int]) -> Tensor:
    """float32 [len(response)] from an SGLang /generate answer.

    `meta_info.input_token_logprobs` is a list of [logprob, token_id, text] for every input token;
    the first entry's logprob is None (nothing precedes it). The response is the input's tail.
    """
    if isinstance(body, list):  # a batched answer; we send one request per sequence
        if len(body) != 1:
            raise MalformedResponse(f"expected one result, got {len(body)}")
        body = body[0]
    try:
        entries = body["meta_info"]["input_token_logprobs"]
    except (KeyError, TypeError) as err:
        raise MalformedResponse(f"no meta_info.input_token_logprobs in the answer ({err!r})") from err
    n = len(response)
    if len(entries) < n:
        raise MalformedResponse(f"{len(entries)} input log-probs for a response of {n} tokens")
    tail = entries[len(entries) - n :]
    values = []
    for entry, token in zip(tail, response):
        logprob, token_id = entry[0], entry[1]
        if token_id is not None and int(token_id) != int(token):
            raise MalformedResponse(f"server scored token {token_id} where the response has {token}")
        # None only for the very first input token, i.e. an empty prompt: no context, no score.
        values.append(TEACHER_FAILED if logprob is None else float(logprob))
    return torch.tensor(values, dtype=torch.float32)
