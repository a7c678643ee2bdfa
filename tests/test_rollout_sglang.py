"""SGLang rollout engine, launcher and weight sync, against fake SGLang servers on 127.0.0.1.

The fake server (http.server in a thread) speaks the request/answer shapes of SGLang's HTTP API
(io_struct GenerateReqInput, UpdateWeights*ReqInput; reference/anchors.md section 8); the
launcher tests start a tiny fake server *script* as a subprocess in place of sglang.launch_server.
The real distributed path is exercised end to end with gloo on CPU: a subprocess plays one
engine rank that joins the weight-update group and receives the broadcast buckets. CUDA-IPC
serialization (SGLang's MultiprocessingSerializer) and NCCL need a GPU node with SGLang.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from uniopd_mcore.config import RolloutConfig, SGLangConfig
from uniopd_mcore.rollout import RolloutEngine, SamplingParams
from uniopd_mcore.rollout.launcher import (
    ServerLaunchError,
    ServerTimeoutError,
    build_server_args,
    engine_gpus,
    extra_args_to_flags,
    launch_servers,
    port_is_free,
    shutdown_servers,
    wait_all_healthy,
)
from uniopd_mcore.rollout.sglang import (
    MalformedGeneration,
    SGLangRequestError,
    SGLangRolloutEngine,
    parse_generation,
    request_seed,
)
from uniopd_mcore.rollout.weight_sync import (
    bucket_named_tensors,
    flatten_bucket,
    tensor_bytes,
    unflatten_bucket,
)
from uniopd_mcore.utils.net import free_port

VOCAB = 50
REPO = Path(__file__).resolve().parents[1]


# ---- a fake SGLang server ----------------------------------------------------------------------


def fake_tokens(prompt: list[int], sp: dict) -> tuple[list[int], list[float], dict]:
    """What the fake server 'samples': a pure function of the request, checked by the tests."""
    seed = sp.get("sampling_seed") or 0
    stops = set(sp.get("stop_token_ids") or [])
    ids, lps = [], []
    for k in range(sp["max_new_tokens"]):
        tok = (sum(prompt) + 7 * k + seed) % VOCAB
        ids.append(tok)
        lps.append(-0.125 * (k + 1))
        if tok in stops:
            return ids, lps, {"type": "stop", "matched": tok}
    return ids, lps, {"type": "length", "length": len(ids)}


class FakeSGLang:
    """One fake server. `events` (shared between servers) records (name, path, payload)."""

    def __init__(self, name: str, events: list, lock: threading.Lock, tp_size: int = 1) -> None:
        self.name, self.events, self.lock, self.tp_size = name, events, lock, tp_size
        self.fail_generate: list[tuple[int, str]] = []  # answers (status, body) for the next /generate
        self.refuse: set[str] = set()  # paths answered with success=false
        self.received: dict[str, torch.Tensor] = {}  # weights the server 'loaded'
        self.bucket_queue: queue.Queue = queue.Queue()  # stub broadcast -> this server
        self.hooks: dict[str, object] = {}  # path -> callable(payload) -> answer dict
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body) -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                fake.record(self.path, None)
                if self.path == "/get_server_info":
                    return self._answer(200, {"tp_size": fake.tp_size})
                if self.path == "/get_weight_version":
                    return self._answer(200, {"weight_version": fake.version})
                self._answer(404, {"detail": "Not Found"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                payload = json.loads(self.rfile.read(length) or b"{}")
                fake.record(self.path, payload)
                status, body = fake.handle(self.path, payload)
                self._answer(status, body)

        self.version = None
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def record(self, path: str, payload) -> None:
        with self.lock:
            self.events.append((self.name, path, payload))

    def handle(self, path: str, payload: dict):
        if path in self.hooks:
            return 200, self.hooks[path](payload)
        if path in self.refuse:
            return 400, {"success": False, "message": f"refused {path}"}
        if path == "/generate":
            if self.fail_generate:
                return self.fail_generate.pop(0)
            ids, lps, reason = fake_tokens(payload["input_ids"], payload["sampling_params"])
            return 200, {
                "text": "",
                "output_ids": ids,
                "meta_info": {
                    "id": "x",
                    "finish_reason": reason,
                    "completion_tokens": len(ids),
                    "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids)],
                },
            }
        if path == "/update_weights_from_disk":
            from safetensors.torch import load_file

            for f in sorted(Path(payload["model_path"]).glob("*.safetensors")):
                self.received.update(load_file(str(f)))
            self.version = payload.get("weight_version")
            return 200, {"success": True, "message": "ok", "num_paused_requests": 0}
        if path == "/update_weights_from_distributed":
            # Like SGLang: allocate from names/dtypes/shapes, 'receive' the flat bucket, load.
            flat = self.bucket_queue.get(timeout=10)
            tensors = [torch.empty(s, dtype=getattr(torch, d)) for d, s in zip(payload["dtypes"], payload["shapes"])]
            expected = sum(t.numel() for t in tensors)
            assert flat.numel() == expected and flat.dtype == tensors[0].dtype
            offset = 0
            for name, t in zip(payload["names"], tensors):
                self.received[name] = flat[offset : offset + t.numel()].view(t.shape).clone()
                offset += t.numel()
            self.version = payload.get("weight_version")
            return 200, {"success": True, "message": "Succeeded to update parameter online."}
        if path == "/flush_cache":
            return 200, "Cache flushed.\nPlease check backend logs for more details."
        return 200, {"success": True, "message": "ok"}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fakes():
    events: list = []
    lock = threading.Lock()
    made: list[FakeSGLang] = []

    def make(n: int, tp_size: int = 1) -> list[FakeSGLang]:
        servers = [FakeSGLang(f"s{len(made) + i}", events, lock, tp_size) for i in range(n)]
        made.extend(servers)
        return servers

    make.events = events
    yield make
    for s in made:
        s.close()


def paths(events, server: str | None = None) -> list[str]:
    return [p for name, p, _ in events if server is None or name == server]


# ---- generate ----------------------------------------------------------------------------------


def test_generate_request_fields_parsing_and_round_robin(fakes):
    a, b = fakes(2)
    engine = SGLangRolloutEngine([a.url, b.url + "/"], max_in_flight=4)
    assert isinstance(engine, RolloutEngine)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=6, stop_token_ids=(3, 44))
    out = engine.generate(prompts, params, seed=123)

    sent = {tuple(p["input_ids"]): (name, p) for name, path, p in fakes.events if path == "/generate"}
    assert len(sent) == 4
    for i, prompt in enumerate(prompts):
        _, payload = sent[tuple(prompt)]
        sp = payload["sampling_params"]
        assert payload["return_logprob"] is True
        assert sp == {
            "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 6, "stop_token_ids": [3, 44],
            "skip_special_tokens": False, "no_stop_trim": True, "sampling_seed": request_seed(123, i),
        }
        ids, lps, reason = fake_tokens(prompt, sp)
        assert out[i].token_ids == ids and out[i].logprobs == lps
        assert out[i].finish_reason == reason["type"]
    assert {g.finish_reason for g in out} <= {"stop", "length"}
    # Round robin: 4 requests over 2 servers, 2 each.
    names = [name for name, _ in sent.values()]
    assert names.count("s0") == 2 and names.count("s1") == 2
    assert engine.counters["requests"] == 4 and engine.counters["retries"] == 0


def test_generate_stop_token_is_kept_and_no_seed_no_stop_fields(fakes):
    (a,) = fakes(1)
    engine = SGLangRolloutEngine([a.url])
    # sum([2]) = 2 -> tokens 2, 9, 16, ...: stop on 9 after two tokens.
    out = engine.generate([[2]], SamplingParams(max_new_tokens=5, stop_token_ids=(9,)))
    assert out[0].token_ids == [2, 9] and out[0].finish_reason == "stop"
    out = engine.generate([[2]], SamplingParams(max_new_tokens=3))
    assert out[0].token_ids == [2, 9, 16] and out[0].finish_reason == "length"
    sp = fakes.events[-1][2]["sampling_params"]
    assert "sampling_seed" not in sp and "stop_token_ids" not in sp
    assert engine.generate([], SamplingParams()) == []
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[1], []], SamplingParams())


def test_request_seed_is_deterministic_and_decorrelated():
    seeds = {request_seed(s, i) for s in range(20) for i in range(20)}
    assert len(seeds) == 400  # seed+index collisions (s, i) vs (s+1, i-1) do not happen
    assert request_seed(5, 3) == request_seed(5, 3)
    assert all(0 <= x < 2**31 for x in seeds)


def test_generate_retries_on_the_next_server(fakes):
    a, b = fakes(2)
    a.fail_generate = [(503, "overloaded")]
    engine = SGLangRolloutEngine([a.url, b.url], max_retries=2, backoff_s=0.0, max_in_flight=1)
    out = engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    assert out[0].token_ids == fake_tokens([1, 2], {"max_new_tokens": 2})[0]
    assert [n for n, p, _ in fakes.events if p == "/generate"] == ["s0", "s1"]
    assert engine.counters["retries"] == 1 and engine.counters["failed_requests"] == 1


def test_generate_abort_is_retried(fakes):
    (a,) = fakes(1)
    reason = {"type": "abort", "message": "paused"}
    aborted = {"text": "", "output_ids": [], "meta_info": {"finish_reason": reason, "output_token_logprobs": []}}
    a.fail_generate = [(200, aborted)]
    engine = SGLangRolloutEngine([a.url], max_retries=1, backoff_s=0.0)
    assert engine.generate([[3]], SamplingParams(max_new_tokens=1))[0].token_ids == [3]


def test_generate_error_after_retries_names_server_status_and_body(fakes):
    (a,) = fakes(1)
    a.fail_generate = [(500, "boom: CUDA out of memory")] * 3
    engine = SGLangRolloutEngine([a.url], max_retries=2, backoff_s=0.0)
    with pytest.raises(SGLangRequestError) as info:
        engine.generate([[1]], SamplingParams(max_new_tokens=1))
    msg = str(info.value)
    assert a.url in msg and "HTTP 500" in msg and "CUDA out of memory" in msg and "3 attempt" in msg


def test_generate_client_error_is_not_retried(fakes):
    (a,) = fakes(1)
    a.fail_generate = [(400, {"error": "input is longer than the context length"})]
    engine = SGLangRolloutEngine([a.url], max_retries=3, backoff_s=0.0)
    with pytest.raises(SGLangRequestError, match="context length"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))
    assert paths(fakes.events).count("/generate") == 1


def test_generate_unreachable_server_is_an_error():
    url = f"http://127.0.0.1:{free_port()}"
    engine = SGLangRolloutEngine([url], max_retries=1, backoff_s=0.0, timeout_s=2)
    with pytest.raises(SGLangRequestError, match="no answer"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))


def test_parse_generation_rejects_inconsistent_answers():
    ok = {"output_ids": [4, 5], "meta_info": {"finish_reason": {"type": "length", "length": 2},
                                              "output_token_logprobs": [[-0.5, 4, None], [-1.0, 5, None]]}}
    g = parse_generation([ok])
    assert g.token_ids == [4, 5] and g.logprobs == [-0.5, -1.0] and g.finish_reason == "length"
    no_ids = {"meta_info": ok["meta_info"]}  # ids recovered from the log-prob entries
    assert parse_generation(no_ids).token_ids == [4, 5]
    bad_token = {**ok, "output_ids": [4, 6]}
    with pytest.raises(MalformedGeneration, match="token 5"):
        parse_generation(bad_token)
    with pytest.raises(MalformedGeneration, match="output_token_logprobs"):
        parse_generation({"output_ids": [], "meta_info": {"finish_reason": {"type": "stop"}}})
    with pytest.raises(MalformedGeneration, match="finish_reason"):
        parse_generation({"output_ids": [], "meta_info": {"finish_reason": None, "output_token_logprobs": []}})


# ---- buckets -----------------------------------------------------------------------------------


def named_weights(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("model.embed_tokens.weight", torch.randn(10, 4, generator=g).to(torch.bfloat16)),
        ("model.layers.0.input_layernorm.weight", torch.randn(4, generator=g)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 4, generator=g).to(torch.bfloat16)),
        ("model.layers.0.mlp.expert_bias", torch.randn(3, generator=g)),
        ("model.layers.0.mlp.gate_proj.weight", torch.randn(6, 4, generator=g).to(torch.bfloat16)),
        ("model.scalar", torch.tensor(2.5)),
        ("model.empty", torch.empty(0, 3, dtype=torch.bfloat16)),
        ("lm_head.weight", torch.randn(10, 4, generator=g).to(torch.bfloat16)),
    ]


def test_buckets_group_by_dtype_respect_size_and_stream():
    weights = named_weights()
    budget = 100  # bytes: the bf16 embed (80 B) fits, embed + q_proj (144 B) does not
    buckets = list(bucket_named_tensors(weights, budget))
    seen = [name for b in buckets for name, _ in b]
    assert sorted(seen) == sorted(n for n, _ in weights)
    for b in buckets:
        assert len({t.dtype for _, t in b}) == 1
        assert len(b) == 1 or sum(tensor_bytes(t) for _, t in b) <= budget
    # Order is kept among the tensors of one dtype.
    for dtype in (torch.bfloat16, torch.float32):
        order = [n for n, t in weights if t.dtype == dtype]
        assert [n for n in seen if n in order] == order
    # Big tensors travel alone.
    big = [(f"w{i}", torch.zeros(40)) for i in range(3)]  # 160 B each > 100 B
    assert [len(b) for b in bucket_named_tensors(big, budget)] == [1, 1, 1]
    # Streaming: the first bucket comes out before the stream is exhausted.
    pulled = []

    def stream():
        for i in range(100):
            pulled.append(i)
            yield f"w{i}", torch.zeros(10)  # 40 B each: 2 per bucket

    first = next(bucket_named_tensors(stream(), budget))
    assert len(first) == 2 and len(pulled) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_flatten_unflatten_round_trip_is_exact(dtype):
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 5), (7,), (), (0, 2), (2, 3, 4)]
    bucket = [(f"t{i}", (torch.randn(s, generator=g) * 100).to(dtype)) for i, s in enumerate(shapes)]
    bucket.append(("strided", (torch.randn(4, 6, generator=g) * 100).to(dtype).t()))  # not contiguous
    flat, meta = flatten_bucket(bucket)
    assert flat.dim() == 1 and flat.dtype == dtype and flat.numel() == sum(t.numel() for _, t in bucket)
    back = unflatten_bucket(flat, meta)
    assert [n for n, _ in back] == [n for n, _ in bucket]
    for (_, a), (_, b) in zip(bucket, back):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    # The flat copy does not alias the source.
    flat.zero_()
    assert any(t.numel() and t.abs().sum() > 0 for _, t in bucket)


def test_flatten_rejects_mixed_dtypes_and_unflatten_checks_sizes():
    with pytest.raises(ValueError, match="one dtype"):
        flatten_bucket([("a", torch.zeros(2)), ("b", torch.zeros(2, dtype=torch.bfloat16))])
    flat, meta = flatten_bucket([("a", torch.zeros(2)), ("b", torch.ones(3))])
    with pytest.raises(ValueError, match="elements"):
        unflatten_bucket(flat[:4], meta)


# ---- weight updates ----------------------------------------------------------------------------


def control_sequence(events, server: str) -> list[str]:
    return [p for p in paths(events, server) if p != "/generate"]


def test_update_weights_disk_mode_round_trip_and_sequence(fakes, tmp_path):
    a, b = fakes(2)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "qwen3"}')
    engine = SGLangRolloutEngine([a.url, b.url], weight_sync="disk", disk_dir=tmp_path / "w",
                                 model_dir=model_dir, bucket_bytes=64)
    weights = named_weights()
    weights.append(("model.tied_alias", weights[0][1]))  # shares storage with the embedding
    engine.update_weights(iter(weights))
    for server in (a, b):
        assert set(server.received) == {n for n, _ in weights}
        for name, t in weights:
            assert server.received[name].dtype == t.dtype and torch.equal(server.received[name], t)
        assert server.version == "1"
        assert control_sequence(fakes.events, server.name) == [
            "/pause_generation", "/update_weights_from_disk", "/flush_cache", "/continue_generation"]
    first_dir = Path(next(p for _, path, p in fakes.events if path == "/update_weights_from_disk")["model_path"])
    assert (first_dir / "config.json").is_file() and len(list(first_dir.glob("*.safetensors"))) > 1
    assert engine.weight_version == 1

    engine.update_weights(named_weights(seed=1))
    assert engine.weight_version == 2 and a.version == "2"
    assert not first_dir.exists()  # the previous version's files are removed
    assert engine.server_weight_versions() == {a.url: "2", b.url: "2"}


def test_update_weights_distributed_sequencing_with_stub_broadcast(fakes):
    a, b = fakes(2, tp_size=2)
    groups, broadcasts = [], []

    def init_group(**kw):
        groups.append(kw)
        return "GROUP"

    def broadcast(flat, group):
        assert group == "GROUP"
        broadcasts.append(flat.clone())
        for server in (a, b):
            server.bucket_queue.put(flat.clone())

    engine = SGLangRolloutEngine(
        [a.url, b.url], weight_sync="distributed", group_backend="gloo", bucket_bytes=64,
        init_group_fn=init_group, broadcast_fn=broadcast, master_port=29123, group_name="g-test",
    )
    weights = named_weights()
    engine.update_weights(iter(weights))
    n_buckets = len(list(bucket_named_tensors(weights, 64)))
    assert n_buckets > 2 and len(broadcasts) == n_buckets
    # tp_size came from /get_server_info: trainer rank 0, server a ranks 1-2, server b ranks 3-4.
    assert groups == [{"master_address": "127.0.0.1", "master_port": 29123, "world_size": 5, "rank": 0,
                       "group_name": "g-test", "backend": "gloo"}]
    inits = {name: p for name, path, p in fakes.events if path == "/init_weights_update_group"}
    assert inits["s0"]["rank_offset"] == 1 and inits["s1"]["rank_offset"] == 3
    for p in inits.values():
        assert p["world_size"] == 5 and p["master_address"] == "127.0.0.1" and p["master_port"] == 29123
        assert p["group_name"] == "g-test" and p["backend"] == "gloo"
    for server in (a, b):
        seq = control_sequence(fakes.events, server.name)
        assert seq == ["/get_server_info", "/pause_generation", "/init_weights_update_group"] + [
            "/update_weights_from_distributed"] * n_buckets + ["/flush_cache", "/continue_generation"]
        for name, t in weights:
            assert torch.equal(server.received[name], t), name
    updates = [p for _, path, p in fakes.events if path == "/update_weights_from_distributed"]
    assert all(p["load_format"] == "flattened_bucket" and p["group_name"] == "g-test" and p["weight_version"] == "1"
               and p["flush_cache"] is False for p in updates)
    assert {d for p in updates for d in p["dtypes"]} == {"bfloat16", "float32"}
    assert next(p for _, path, p in fakes.events if path == "/pause_generation") == {"mode": "abort"}

    # Second update: the group is reused, not created again.
    fakes.events.clear()
    engine.update_weights(named_weights(seed=2))
    assert len(groups) == 1 and "/init_weights_update_group" not in paths(fakes.events)
    assert a.version == "2" and engine.weight_version == 2


def test_update_weights_tensor_mode_sequencing_with_stub_serializer(fakes):
    (a,) = fakes(1)
    serialized = []

    def serialize(flat, meta):
        serialized.append((flat.clone(), meta))
        return f"bucket-{len(serialized)}"

    engine = SGLangRolloutEngine([a.url], weight_sync="tensor", tp_size=2, bucket_bytes=64,
                                 serialize_fn=serialize, transfer_device="cpu")
    engine.update_weights(named_weights())
    updates = [p for _, path, p in fakes.events if path == "/update_weights_from_tensor"]
    assert len(updates) == len(serialized) > 2
    for k, p in enumerate(updates):
        assert p["serialized_named_tensors"] == [f"bucket-{k + 1}"] * 2  # one per TP rank
        assert p["load_format"] == "flattened_bucket" and p["weight_version"] == "1"
    got = dict(pair for flat, meta in serialized for pair in unflatten_bucket(flat, meta))
    for name, t in named_weights():
        assert torch.equal(got[name], t)
    assert control_sequence(fakes.events, "s0") == (
        ["/pause_generation"] + ["/update_weights_from_tensor"] * len(updates)
        + ["/flush_cache", "/continue_generation"])


def test_failed_update_raises_and_leaves_servers_paused(fakes, tmp_path):
    (a,) = fakes(1)
    a.refuse.add("/update_weights_from_disk")
    engine = SGLangRolloutEngine([a.url], weight_sync="disk", disk_dir=tmp_path)
    with pytest.raises(SGLangRequestError, match="refused /update_weights_from_disk"):
        engine.update_weights(named_weights())
    assert "/continue_generation" not in paths(fakes.events) and engine.weight_version == 0


def test_release_and_resume_memory(fakes):
    a, b = fakes(2)
    engine = SGLangRolloutEngine([a.url, b.url])
    engine.release_memory()
    engine.resume_memory(tags=["weights"])
    calls = [(n, p, pl) for n, p, pl in fakes.events]
    assert sorted(calls, key=lambda c: (c[1], c[0])) == [
        ("s0", "/release_memory_occupation", {}), ("s1", "/release_memory_occupation", {}),
        ("s0", "/resume_memory_occupation", {"tags": ["weights"]}),
        ("s1", "/resume_memory_occupation", {"tags": ["weights"]}),
    ]


# ---- the real distributed path with gloo: a subprocess plays the engine rank -----------------

ENGINE_RANK = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from uniopd_mcore.rollout.weight_sync import init_weight_update_group
    group = None
    for line in sys.stdin:
        msg = json.loads(line)
        if "init" in msg:
            i = msg["init"]
            group = init_weight_update_group(i["master_address"], i["master_port"], i["world_size"],
                                             rank=i["rank_offset"], group_name=i["group_name"],
                                             backend=i["backend"], timeout_s=60)
            print(json.dumps({"joined": True}), flush=True)
        elif "names" in msg:  # what SGLang does for load_format="flattened_bucket"
            parts = [torch.empty(s, dtype=getattr(torch, d)) for d, s in zip(msg["dtypes"], msg["shapes"])]
            flat = torch.cat([p.reshape(-1) for p in parts])
            dist.broadcast(flat, group=group, group_src=0)
            out, o = {}, 0
            for name, p in zip(msg["names"], parts):
                out[name] = flat[o:o + p.numel()].float().tolist()
                o += p.numel()
            print(json.dumps(out), flush=True)
        else:
            dist.destroy_process_group(group)
            print(json.dumps({"bye": True}), flush=True)
            break
    """
)


def test_distributed_update_over_a_real_gloo_group(fakes, tmp_path):
    (a,) = fakes(1)
    script = tmp_path / "engine_rank.py"
    script.write_text(ENGINE_RANK)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)

    def talk(msg):
        proc.stdin.write(json.dumps(msg) + "\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    a.hooks["/init_weights_update_group"] = lambda p: {"success": bool(talk({"init": p}).get("joined"))}

    def receive(p):
        a.received.update({k: torch.tensor(v) for k, v in talk(p).items()})
        return {"success": True, "message": "ok"}

    a.hooks["/update_weights_from_distributed"] = receive
    a.hooks["/destroy_weights_update_group"] = lambda p: {"success": bool(talk({"bye": 1}).get("bye")), "message": ""}
    try:
        engine = SGLangRolloutEngine([a.url], weight_sync="distributed", group_backend="gloo", tp_size=1,
                                     bucket_bytes=64, group_name="uniopd-test-gloo")
        weights = named_weights()
        engine.update_weights(iter(weights))
        for name, t in weights:
            assert torch.equal(a.received[name].reshape(t.shape), t.float()), name
        engine.shutdown()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.gpu
def test_nccl_weight_update_group_on_gpu():
    """GPU only: the group builds with NCCL and a flat CUDA bucket goes through the broadcast
    (a one-member group: NCCL refuses two ranks on one GPU, and the cross-process case needs a
    second GPU plus a real SGLang server)."""
    from uniopd_mcore.rollout.weight_sync import broadcast_from_trainer, init_weight_update_group

    bucket = [(n, t) for n, t in named_weights() if t.dtype == torch.bfloat16]
    flat, meta = flatten_bucket(bucket, device="cuda")
    group = init_weight_update_group("127.0.0.1", free_port(), 1, rank=0, group_name="uniopd-gpu-test")
    before = flat.clone()
    broadcast_from_trainer(flat, group)
    assert torch.equal(flat, before)
    for (_, a), (_, b) in zip(bucket, unflatten_bucket(flat, meta)):
        assert torch.equal(a.cuda(), b)


@pytest.mark.gpu
def test_cuda_ipc_payload_with_sglang_serializer():
    """GPU + SGLang only: the /update_weights_from_tensor payload builds and deserializes to
    SGLang's flattened-bucket dict."""
    pytest.importorskip("sglang")
    from sglang.srt.utils import MultiprocessingSerializer

    from uniopd_mcore.rollout.weight_sync import serialize_bucket_for_ipc

    flat, meta = flatten_bucket([(n, t) for n, t in named_weights() if t.dtype == torch.bfloat16], device="cuda")
    payload = serialize_bucket_for_ipc(flat, meta)
    assert isinstance(payload, str)
    back = MultiprocessingSerializer.deserialize(payload)
    assert torch.equal(back["flattened_tensor"], flat)
    assert [m.name for m in back["metadata"]] == [m.name for m in meta]


# ---- launcher ----------------------------------------------------------------------------------

FAKE_SERVER = textwrap.dedent(
    """
    import argparse, json, os, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    ap = argparse.ArgumentParser()
    ap.add_argument("--host"); ap.add_argument("--port", type=int)
    ap.add_argument("--fake-mode", default="ok"); ap.add_argument("--fake-record")
    args, _ = ap.parse_known_args()
    if args.fake_record:
        with open(f"{args.fake_record}.{args.port}", "w") as f:
            json.dump({"argv": sys.argv[1:], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)
    print("loading weights ...", flush=True)
    if args.fake_mode == "die":
        print("RuntimeError: fake CUDA out of memory", flush=True)
        sys.exit(3)
    if args.fake_mode == "hang":
        time.sleep(600)
    time.sleep(0.3)
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_GET(self):
            ok = self.path == "/health" or (self.path == "/health_generate" and args.fake_mode != "old")
            self.send_response(200 if ok else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
    HTTPServer((args.host, args.port), H).serve_forever()
    """
)


@pytest.fixture
def fake_server_cmd(tmp_path):
    script = tmp_path / "fake_sglang_server.py"
    script.write_text(FAKE_SERVER)
    return [sys.executable, str(script)]


def free_port_pair() -> int:
    for _ in range(50):
        p = free_port()
        if p < 65000 and port_is_free("127.0.0.1", p + 1):
            return p
    raise RuntimeError("no two consecutive free ports")


def test_server_args_and_gpu_assignment():
    args = build_server_args("/m", port=31000, tp_size=2, mem_fraction_static=0.6,
                             extra_args={"chunked_prefill_size": "4096", "enable_deterministic_inference": "true",
                                         "disable_radix_cache": "false"})
    assert args == ["--model-path", "/m", "--host", "127.0.0.1", "--port", "31000", "--tp-size", "2",
                    "--mem-fraction-static", "0.6", "--enable-memory-saver", "--chunked-prefill-size", "4096",
                    "--enable-deterministic-inference"]
    assert extra_args_to_flags({"--log-level": "warning", "x": True, "y": None}) == ["--log-level", "warning", "--x"]
    assert engine_gpus(2, 2) == [["0", "1"], ["2", "3"]]
    assert engine_gpus(2, 1, first_gpu=2, visible="4,5,6,7") == [["6"], ["7"]]
    with pytest.raises(ValueError, match="this node has 4"):
        engine_gpus(3, 2, gpus_per_node=4)


def test_launch_healthy_servers(fake_server_cmd, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    port = free_port_pair()
    record = tmp_path / "rec"
    handles = launch_servers("/models/tiny", num_engines=2, tp_size=2, base_port=port, mem_fraction_static=0.5,
                             extra_args={"fake_record": str(record)}, log_dir=tmp_path / "logs",
                             command=fake_server_cmd)
    try:
        wait_all_healthy(handles, timeout_s=30, poll_s=0.05)
        assert [h.url for h in handles] == [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
        for i, h in enumerate(handles):
            rec = json.loads(Path(f"{record}.{port + i}").read_text())
            assert rec["cuda"] == ["4,5", "6,7"][i]
            argv = rec["argv"]
            assert argv[:12] == ["--model-path", "/models/tiny", "--host", "127.0.0.1", "--port", str(port + i),
                                 "--tp-size", "2", "--mem-fraction-static", "0.5", "--enable-memory-saver",
                                 "--fake-record"]
            assert h.log_path.is_file() and "loading weights" in h.log_tail()
            assert h.alive()
    finally:
        shutdown_servers(handles)
    assert all(not h.alive() for h in handles)


def test_launch_server_that_dies_early_reports_its_log(fake_server_cmd, tmp_path):
    handles = launch_servers("/m", base_port=free_port(), extra_args={"fake_mode": "die"},
                             log_dir=tmp_path, command=fake_server_cmd)
    with pytest.raises(ServerLaunchError) as info:
        wait_all_healthy(handles, timeout_s=30, poll_s=0.05)
    msg = str(info.value)
    assert "exited with code 3" in msg and "fake CUDA out of memory" in msg and str(handles[0].log_path) in msg


def test_launch_server_timeout_reports_its_log_and_is_stopped(fake_server_cmd, tmp_path):
    handles = launch_servers("/m", base_port=free_port(), extra_args={"fake_mode": "hang"},
                             log_dir=tmp_path, command=fake_server_cmd)
    start = time.monotonic()
    with pytest.raises(ServerTimeoutError) as info:
        wait_all_healthy(handles, timeout_s=1.0, poll_s=0.1)
    assert time.monotonic() - start < 15
    assert "not healthy after" in str(info.value) and "loading weights" in str(info.value)
    assert not handles[0].alive()  # wait_all_healthy stopped the pool


def test_health_falls_back_to_health_and_busy_port_is_refused(fake_server_cmd, tmp_path):
    port = free_port()
    handles = launch_servers("/m", base_port=port, extra_args={"fake_mode": "old"}, log_dir=tmp_path,
                             command=fake_server_cmd)
    try:
        wait_all_healthy(handles, timeout_s=30, poll_s=0.05)
        with pytest.raises(ServerLaunchError, match="in use"):
            launch_servers("/m", base_port=port, log_dir=tmp_path, command=fake_server_cmd)
    finally:
        shutdown_servers(handles)


def test_from_config_launches_and_shuts_down(fake_server_cmd, tmp_path):
    port = free_port_pair()
    cfg = RolloutConfig(engine="sglang", colocate=False,
                        sglang=SGLangConfig(num_engines=2, base_port=port, mem_fraction_static=0.4))
    engine = SGLangRolloutEngine.from_config(cfg, tmp_path, log_dir=tmp_path / "logs",
                                             launch_command=fake_server_cmd, wait_timeout_s=30)
    try:
        assert engine.servers == [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
        assert engine.weight_sync == "distributed" and engine.tp_size == 1
        assert all(h.alive() for h in engine.handles)
        handles = list(engine.handles)
    finally:
        engine.shutdown()
    assert all(not h.alive() for h in handles)
    with pytest.raises(ValueError, match="not 'sglang'"):
        SGLangRolloutEngine.from_config(RolloutConfig(), tmp_path)
