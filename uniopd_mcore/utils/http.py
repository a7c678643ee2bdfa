"""JSON over HTTP with the standard library, for talking to SGLang servers.

Every failure comes back as one exception type that names the URL, the HTTP status (None when no
answer arrived) and the start of the body, because "HTTP 400" alone says nothing about why a server
refused a request (a prompt longer than its context, a weight name it does not know, ...).
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Iterator, Sequence

# 4xx answers other than these mean the request itself is wrong: sending it again cannot help.
RETRYABLE_HTTP = frozenset({408, 429})


def excerpt(text: str | bytes, limit: int = 400) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


class HTTPRequestError(RuntimeError):
    """A request that got no usable answer: connection error, timeout, HTTP error, bad JSON."""

    def __init__(self, url: str, status: int | None, detail: str) -> None:
        self.url = url
        self.status = status
        self.detail = detail
        what = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"{url}: {what}: {detail}")

    @property
    def retryable(self) -> bool:
        """True when the same request may succeed later or on another server."""
        return self.status is None or self.status >= 500 or self.status in RETRYABLE_HTTP


def request(
    url: str,
    payload: Any = None,
    *,
    method: str | None = None,
    timeout: float = 60.0,
    api_key: str | None = None,
) -> Any:
    """Send `payload` as JSON (POST; GET when payload is None and no method is given).

    Returns the decoded JSON answer, the raw text when the answer is not JSON (some SGLang control
    endpoints, e.g. /flush_cache, answer plain text), or None for an empty body.
    """
    headers = {"Accept": "application/json"}
    data = None
    if payload is not None:
        data = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    method = method or ("GET" if payload is None else "POST")
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as err:
        try:
            detail = excerpt(err.read()) or err.reason
        except Exception:  # the body itself could not be read; the status is what matters
            detail = str(err.reason)
        raise HTTPRequestError(url, err.code, detail) from err
    except (OSError, http.client.HTTPException) as err:  # refused, reset, timeout, cut off
        raise HTTPRequestError(url, None, f"{type(err).__name__}: {err}") from err
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace")


class RoundRobin:
    """A pool of servers used round-robin, with retries on the next servers.

    A request's first attempt takes the pool's next server; its retries walk on from there, so they
    reach every server in turn even while other threads take their turns. Retry k (k = 1, 2, ...)
    waits min(max_backoff_s, backoff_s * 2^(k-1)) first.
    """

    def __init__(self, servers: Sequence[str], *, max_retries: int, backoff_s: float, max_backoff_s: float):
        self.servers = list(servers)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def attempts(self) -> Iterator[tuple[int, str]]:
        """(attempt number, server) for the first try and each retry; stop iterating on success."""
        with self._lock:
            start = next(self._turn)
        for attempt in range(self.max_retries + 1):
            if attempt > 0:
                time.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
            yield attempt, self.servers[(start + attempt) % len(self.servers)]
