"""Rollout engine over SGLang HTTP servers (DESIGN.md section 2; reference/anchors.md 1.4, 8).

Generation: one `/generate` request per prompt, token ids in and out (no tokenizer round trip),
`return_logprob` for the rollout log-probs, requests spread round-robin over the servers by a
thread pool; a failed request is retried on the next server; a prompt whose attempts all fail
raises (unlike a teacher, a missing rollout cannot be papered over with a sentinel).

Weights: the learner's HF-named stream is bucketed (~512 MB, one dtype per bucket, see
weight_sync.py) and pushed with the sequence slime uses (anchors.md 1.4):

    pause_generation -> [init_weights_update_group, once] -> one update per bucket
    -> flush_cache -> continue_generation

by one of three transports:
- "distributed" (engines on other GPUs): a process group with the trainer as rank 0 and every
  engine TP rank after it (engine e's ranks start at 1 + sum of earlier engines' tp sizes),
  NCCL by default; per bucket the server is told names/dtypes/shapes on a background thread
  (the request blocks until the broadcast arrives) while this thread broadcasts the flat bucket.
- "tensor" (colocated on the same GPUs): the flat CUDA bucket goes by CUDA-IPC handle
  (SGLang's MultiprocessingSerializer) to /update_weights_from_tensor, load_format
  "flattened_bucket". With tp_size > 1 every server rank opens the same handle (this process's
  GPU), which needs peer access between the GPUs.
- "disk": safetensors files written here and read by /update_weights_from_disk; the directory
  must be visible to the servers (same node or a shared file system). Slow, works everywhere.

Call update_weights from ONE learner process (the rank that is rank 0 of the weight-update
group); the other learner ranks must still drain the same export if it runs collectives.
Every update bumps `weight_version` and sends it to the servers (/get_weight_version).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from uniopd_mcore.rollout.base import FINISH_LENGTH, FINISH_STOP, Generation, SamplingParams
from uniopd_mcore.rollout.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    TensorMeta,
    broadcast_from_trainer,
    bucket_named_tensors,
    bucket_request_fields,
    destroy_weight_update_group,
    flatten_bucket,
    init_weight_update_group,
    serialize_bucket_for_ipc,
    unflatten_bucket,
)
from uniopd_mcore.utils.http import HTTPRequestError, RoundRobin, request
from uniopd_mcore.utils.net import free_port

logger = logging.getLogger(__name__)

WEIGHT_SYNC_MODES = ("distributed", "tensor", "disk")


class SGLangRequestError(RuntimeError):
    """A server request that failed for good; the message names the server and its answer."""


class MalformedGeneration(ValueError):
    """The server answered /generate, but not with what a rollout needs."""


class AbortedGeneration(RuntimeError):
    """The server aborted the request (e.g. paused with mode 'abort'): worth another try."""


def request_seed(seed: int, index: int) -> int:
    """Per-request sampling seed of prompt `index` in a call seeded with `seed`.

    Hashed, not seed + index, so that calls with neighbouring seeds share no request seeds
    (seed 1 / prompt 0 and seed 0 / prompt 1 must not sample alike). In [0, 2^31).
    """
    digest = hashlib.blake2b(f"{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31)


def generate_payload(prompt: Sequence[int], params: SamplingParams, sampling_seed: int | None) -> dict:
    sampling: dict[str, Any] = {
        "temperature": params.temperature,  # SGLang samples greedily at 0 (top_k = 1)
        "top_p": params.top_p,
        "max_new_tokens": params.max_new_tokens,
        # Token ids are what the learner sees: keep special tokens and the stop token in the
        # output (no_stop_trim), as the embedded engine does.
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if params.stop_token_ids:
        sampling["stop_token_ids"] = list(params.stop_token_ids)
    if sampling_seed is not None:
        # Honoured for non-greedy sampling by servers started with
        # --enable-deterministic-inference (SGLang docs, "Deterministic Inference").
        sampling["sampling_seed"] = sampling_seed
    return {"input_ids": [int(t) for t in prompt], "sampling_params": sampling, "return_logprob": True}


def parse_generation(body: Any) -> Generation:
    """Generation from a /generate answer: `output_ids`, `meta_info.output_token_logprobs`
    ([logprob, token_id, text] per generated token), `meta_info.finish_reason` ({"type": ...})."""
    if isinstance(body, list):  # a batched answer; we send one prompt per request
        if len(body) != 1:
            raise MalformedGeneration(f"expected one result, got {len(body)}")
        body = body[0]
    if not isinstance(body, dict) or not isinstance(body.get("meta_info"), dict):
        raise MalformedGeneration(f"no meta_info in the answer: {str(body)[:200]}")
    meta = body["meta_info"]
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind == "abort":
        message = reason.get("message", "") if isinstance(reason, dict) else ""
        raise AbortedGeneration(f"request aborted by the server {message}".strip())
    if kind not in (FINISH_STOP, FINISH_LENGTH):
        raise MalformedGeneration(f"unexpected finish_reason {reason!r}")
    entries = meta.get("output_token_logprobs")
    if entries is None:
        raise MalformedGeneration("no meta_info.output_token_logprobs (was return_logprob dropped?)")
    ids = body.get("output_ids")
    if ids is None:  # some versions omit output_ids; the log-prob entries carry the ids too
        ids = [entry[1] for entry in entries]
    if len(entries) != len(ids):
        raise MalformedGeneration(f"{len(ids)} output ids but {len(entries)} output log-probs")
    logprobs = []
    for entry, token in zip(entries, ids):
        logprob, token_id = entry[0], entry[1]
        if token_id is not None and int(token_id) != int(token):
            raise MalformedGeneration(f"log-prob entry for token {token_id} where the output has {token}")
        if logprob is None:
            raise MalformedGeneration("an output token has no log-prob")
        logprobs.append(float(logprob))
    return Generation(token_ids=[int(t) for t in ids], logprobs=logprobs, finish_reason=kind)


class SGLangRolloutEngine:
    """RolloutEngine over SGLang servers, e.g. ["http://127.0.0.1:30000", "http://127.0.0.1:30001"]."""

    def __init__(
        self,
        servers: Sequence[str],
        *,
        timeout_s: float = 3600.0,
        max_in_flight: int = 256,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        api_key: str | None = None,
        weight_sync: str = "distributed",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        tp_size: int | None = None,
        master_address: str = "127.0.0.1",
        master_port: int | None = None,
        group_name: str = "uniopd_weight_update",
        group_backend: str = "nccl",
        flattened_bucket: bool = True,
        transfer_device: str | torch.device | None = None,
        broadcast_fn: Callable[[Tensor, Any], None] | None = None,
        init_group_fn: Callable[..., Any] | None = None,
        serialize_fn: Callable[[Tensor, list[TensorMeta]], str] | None = None,
        disk_dir: str | os.PathLike | None = None,
        model_dir: str | os.PathLike | None = None,
        pause_mode: str = "abort",
        control_timeout_s: float = 1800.0,
        flush_retries: int = 60,
        flush_retry_s: float = 1.0,
        handles: Sequence[Any] = (),
    ) -> None:
        """timeout_s: per /generate request (a 16K-token rollout takes minutes).
        max_retries: attempts after the first, each on the next server; backoff before retry k
        (k = 0, 1, ...) is min(max_backoff_s, backoff_s * 2^k).
        tp_size: TP size of every server (ranks in the weight-update group); None asks each
        server (/get_server_info) when the group is first created.
        master_address/master_port: where the servers reach this process for the group
        (127.0.0.1 only works for servers on this node); port None picks a free one.
        group_backend: "nccl" on GPUs; "gloo" lets the distributed path run on CPU (tests).
        transfer_device: where flat buckets are built; None = "cuda" for NCCL / tensor mode, CPU
        otherwise. broadcast_fn / init_group_fn / serialize_fn replace the real transports.
        disk_dir: where disk mode writes weights (default: a fresh temporary directory);
        model_dir: config files copied next to them so the directory is a loadable checkpoint.
        handles: launcher ServerHandles this engine owns (stopped by shutdown()).
        """
        if not servers:
            raise ValueError("SGLangRolloutEngine needs at least one server URL")
        if weight_sync not in WEIGHT_SYNC_MODES:
            raise ValueError(f"weight_sync must be one of {WEIGHT_SYNC_MODES}, got {weight_sync!r}")
        if pause_mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause_mode must be abort, retract or in_place, got {pause_mode!r}")
        self.servers = [s.rstrip("/") for s in servers]
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.api_key = api_key
        self.weight_sync = weight_sync
        self.bucket_bytes = bucket_bytes
        self.tp_size = tp_size
        self.master_address = master_address
        self.master_port = master_port
        self.group_name = group_name
        self.group_backend = group_backend
        self.flattened_bucket = flattened_bucket
        self.transfer_device = transfer_device
        self._broadcast = broadcast_fn or broadcast_from_trainer
        self._init_group = init_group_fn or init_weight_update_group
        self._serialize = serialize_fn or serialize_bucket_for_ipc
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.pause_mode = pause_mode
        self.control_timeout_s = control_timeout_s
        self.flush_retries = flush_retries
        self.flush_retry_s = flush_retry_s
        self.handles = list(handles)

        self.weight_version = 0
        self._group: Any = None
        self._engine_tp: list[int] | None = None
        self._last_disk_version: Path | None = None
        self._lock = threading.Lock()
        self._pool = RoundRobin(self.servers, max_retries=max_retries, backoff_s=backoff_s,
                                max_backoff_s=max_backoff_s)
        self.counters = {"requests": 0, "retries": 0, "failed_requests": 0, "generations": 0}

    # ---- construction from the configuration -------------------------------------------------

    @classmethod
    def from_config(
        cls,
        rollout_cfg,
        model_dir: str | os.PathLike,
        *,
        servers: Sequence[str] | None = None,
        log_dir: str | os.PathLike | None = None,
        weight_sync: str | None = None,
        wait_timeout_s: float = 900.0,
        launch_command: Sequence[str] | None = None,
        **kwargs,
    ) -> "SGLangRolloutEngine":
        """Engine for `rollout_cfg` (config.RolloutConfig): attach to `servers` (or
        rollout_cfg.sglang.servers when the configuration has such a field), else launch
        rollout_cfg.sglang.num_engines servers of `model_dir` on this node and wait for them.

        weight_sync default: "tensor" (CUDA IPC) when rollout_cfg.colocate, else "distributed".
        """
        if getattr(rollout_cfg, "engine", "sglang") != "sglang":
            raise ValueError(f"rollout.engine is {rollout_cfg.engine!r}, not 'sglang'")
        from uniopd_mcore.rollout.launcher import launch_servers, wait_all_healthy

        sg = rollout_cfg.sglang
        urls = list(servers or getattr(sg, "servers", None) or [])
        handles = []
        if not urls:
            handles = launch_servers(
                model_dir, sg.num_engines, sg.tp_size, host=sg.host, base_port=sg.base_port,
                mem_fraction_static=sg.mem_fraction_static, extra_args=sg.extra_args,
                log_dir=log_dir, command=launch_command,
            )
            wait_all_healthy(handles, timeout_s=wait_timeout_s)
            urls = [h.url for h in handles]
        mode = weight_sync or getattr(sg, "weight_sync", None) or ("tensor" if rollout_cfg.colocate else "distributed")
        kwargs.setdefault("tp_size", sg.tp_size)
        kwargs.setdefault("model_dir", model_dir)
        return cls(urls, weight_sync=mode, handles=handles, **kwargs)

    # ---- generation -------------------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seed: int | None = None
    ) -> list[Generation]:
        """One response per prompt, in prompt order. With a seed, prompt i is sampled with
        request_seed(seed, i), so repeated prompts (a group) still get different samples."""
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: a causal LM needs at least one token")
        if not prompts:
            return []
        payloads = [
            generate_payload(p, params, None if seed is None else request_seed(seed, i))
            for i, p in enumerate(prompts)
        ]
        workers = max(1, min(self.max_in_flight, len(prompts)))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sglang-rollout")
        try:
            futures = [pool.submit(self._generate_one, i, len(prompts), pl) for i, pl in enumerate(payloads)]
            return [f.result() for f in futures]
        finally:
            # On an error, do not wait for the remaining rollouts of a failed step.
            pool.shutdown(wait=False, cancel_futures=True)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def _generate_one(self, index: int, total: int, payload: dict) -> Generation:
        last = ""
        attempts = 0
        for attempt, server in self._pool.attempts():
            if attempt > 0:
                self._count("retries")
            attempts += 1
            self._count("requests")
            try:
                body = request(server + "/generate", payload, timeout=self.timeout_s, api_key=self.api_key)
                generation = parse_generation(body)
                self._count("generations")
                return generation
            except HTTPRequestError as err:
                self._count("failed_requests")
                last = str(err)
                if not err.retryable:
                    break
            except AbortedGeneration as err:
                self._count("failed_requests")
                last = f"{server}/generate: {err}"
            except MalformedGeneration as err:  # deterministic: the same request, the same answer
                self._count("failed_requests")
                last = f"{server}/generate: malformed answer: {err}"
                break
        raise SGLangRequestError(
            f"SGLang /generate failed for prompt {index} of {total} after {attempts} attempt(s); last error: {last}"
        )

    # ---- control requests -------------------------------------------------------------------

    def _call(self, server: str, path: str, payload: Any = None, *, method: str | None = None) -> Any:
        """One control request; raises SGLangRequestError on an HTTP error or success=false."""
        try:
            body = request(server + path, payload, method=method, timeout=self.control_timeout_s, api_key=self.api_key)
        except HTTPRequestError as err:
            raise SGLangRequestError(f"SGLang {path} failed: {err}") from err
        if isinstance(body, dict) and body.get("success") is False:
            raise SGLangRequestError(f"SGLang {path} refused by {server}: {body.get('message', body)}")
        return body

    def _call_all(self, path: str, payload: Any = None, *, method: str | None = None) -> list[Any]:
        """The same control request to every server, concurrently; the first error raises."""
        if len(self.servers) == 1:
            return [self._call(self.servers[0], path, payload, method=method)]
        with ThreadPoolExecutor(max_workers=len(self.servers), thread_name_prefix="sglang-control") as pool:
            futures = [pool.submit(self._call, s, path, payload, method=method) for s in self.servers]
            return [f.result() for f in futures]

    def pause_generation(self) -> None:
        self._call_all("/pause_generation", {"mode": self.pause_mode})

    def continue_generation(self) -> None:
        self._call_all("/continue_generation", {})

    def flush_cache(self) -> None:
        """/flush_cache on every server; SGLang refuses while requests are pending, so retry."""
        for server in self.servers:
            for attempt in range(self.flush_retries + 1):
                try:
                    self._call(server, "/flush_cache", {})
                    break
                except SGLangRequestError:
                    if attempt == self.flush_retries:
                        raise
                    time.sleep(self.flush_retry_s)

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Hand GPU memory back to the learner (colocated runs; servers need
        --enable-memory-saver). tags: subset of ["weights", "kv_cache"], None = all."""
        self._call_all("/release_memory_occupation", {"tags": tags} if tags else {})

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self._call_all("/resume_memory_occupation", {"tags": tags} if tags else {})

    def server_weight_versions(self) -> dict[str, Any]:
        """What each server reports from /get_weight_version (the version of the last update)."""
        out = {}
        for server in self.servers:
            body = self._call(server, "/get_weight_version")
            out[server] = body.get("weight_version") if isinstance(body, dict) else body
        return out

    # ---- weights ----------------------------------------------------------------------------

    def update_weights(
        self, named_tensors: Iterable[tuple[str, Tensor]], weight_version: int | None = None
    ) -> None:
        """Push the learner's weights (HF names, streamed) to every server.

        On failure the servers are left paused (their weights may be partly updated: generating
        with them would be silently wrong) and the error propagates.
        """
        version = self.weight_version + 1 if weight_version is None else int(weight_version)
        buckets = bucket_named_tensors(named_tensors, self.bucket_bytes)
        sent, version_dir = 0, None
        if self.weight_sync == "disk":
            # Written before pausing: the servers keep serving while the files are produced.
            version_dir, sent = self._write_disk_version(buckets, version)
            if sent == 0:
                shutil.rmtree(version_dir, ignore_errors=True)
                raise ValueError("update_weights got no tensors: nothing was sent")
        else:
            self._engine_tp_sizes()  # asked before pausing: a failure here leaves nothing paused
        self.pause_generation()
        if self.weight_sync == "distributed":
            sent = self._send_distributed(buckets, version)
        elif self.weight_sync == "tensor":
            sent = self._send_tensor(buckets, version)
        else:
            self._call_all(
                "/update_weights_from_disk",
                {"model_path": str(version_dir), "flush_cache": False, "weight_version": str(version)},
            )
        self.flush_cache()
        self.continue_generation()
        if sent == 0:
            raise ValueError("update_weights got no tensors: nothing was sent")
        if self.weight_sync == "disk":
            self._drop_previous_disk_version(version_dir)
        self.weight_version = version
        logger.info(
            "weights v%d pushed to %d SGLang server(s) (%s, %d tensors)",
            version, len(self.servers), self.weight_sync, sent,
        )

    def _device(self, default: str) -> torch.device:
        return torch.device(self.transfer_device if self.transfer_device is not None else default)

    def _engine_tp_sizes(self) -> list[int]:
        if self._engine_tp is None:
            if self.tp_size is not None:
                self._engine_tp = [int(self.tp_size)] * len(self.servers)
            else:
                self._engine_tp = [self._query_tp_size(s) for s in self.servers]
        return self._engine_tp

    def _query_tp_size(self, server: str) -> int:
        for path in ("/get_server_info", "/server_info"):
            try:
                body = request(server + path, timeout=self.control_timeout_s, api_key=self.api_key)
            except HTTPRequestError:
                continue
            if isinstance(body, dict) and "tp_size" in body:
                return int(body["tp_size"])
        raise SGLangRequestError(f"could not read tp_size from {server} (/get_server_info); pass tp_size=")

    def _ensure_group(self) -> Any:
        """Create the weight-update group once: every server joins through
        /init_weights_update_group (which blocks until all members have joined) while this
        process joins as rank 0."""
        if self._group is not None:
            return self._group
        tp = self._engine_tp_sizes()
        world_size = 1 + sum(tp)
        port = self.master_port or free_port(self.master_address)
        offsets = [1 + sum(tp[:i]) for i in range(len(self.servers))]
        with ThreadPoolExecutor(max_workers=len(self.servers), thread_name_prefix="sglang-group") as pool:
            futures = [
                pool.submit(
                    self._call, server, "/init_weights_update_group",
                    {
                        "master_address": self.master_address, "master_port": port, "rank_offset": offset,
                        "world_size": world_size, "group_name": self.group_name, "backend": self.group_backend,
                    },
                )
                for server, offset in zip(self.servers, offsets)
            ]
            try:
                group = self._init_group(
                    master_address=self.master_address, master_port=port, world_size=world_size,
                    rank=0, group_name=self.group_name, backend=self.group_backend,
                )
            except Exception as err:
                raise SGLangRequestError(
                    f"joining the weight-update group {self.group_name!r} at {self.master_address}:{port} "
                    f"(world size {world_size}) failed: {err}"
                ) from err
            _results(futures)
        self._group = group
        logger.info("weight-update group %r ready: trainer + %d engine ranks", self.group_name, world_size - 1)
        return group

    def _send_distributed(self, buckets: Iterator[list[tuple[str, Tensor]]], version: int) -> int:
        group = self._ensure_group()
        device = self._device("cuda" if self.group_backend == "nccl" else "cpu")
        sent = 0
        with ThreadPoolExecutor(max_workers=len(self.servers), thread_name_prefix="sglang-update") as pool:
            for bucket in buckets:
                flat, meta = flatten_bucket(bucket, device)
                payload = {
                    **bucket_request_fields(meta), "group_name": self.group_name,
                    "flush_cache": False, "weight_version": str(version),
                }
                if self.flattened_bucket:
                    payload["load_format"] = "flattened_bucket"
                # The servers block in these requests until the broadcast below reaches them.
                futures = [
                    pool.submit(self._call, s, "/update_weights_from_distributed", payload) for s in self.servers
                ]
                try:
                    if self.flattened_bucket:
                        self._broadcast(flat, group)
                    else:  # one broadcast per tensor, in request order (SGLang's default path)
                        for _, tensor in unflatten_bucket(flat, meta):
                            self._broadcast(tensor, group)
                finally:
                    # `flat` must outlive the transfer: it is dropped only after the servers
                    # answered, i.e. after they received and loaded it.
                    _results(futures)
                sent += len(meta)
        return sent

    def _send_tensor(self, buckets: Iterator[list[tuple[str, Tensor]]], version: int) -> int:
        device = self._device("cuda")
        tp = self._engine_tp_sizes()
        sent = 0
        # SGLang may answer before its copy out of our buffer has finished on the GPU (slime
        # notes this race), so the last buckets stay referenced and never get reused early.
        keep: list[Tensor] = []
        for bucket in buckets:
            flat, meta = flatten_bucket(bucket, device)
            serialized = self._serialize(flat, meta)
            for server, n_ranks in zip(self.servers, tp):
                self._call(
                    server, "/update_weights_from_tensor",
                    {
                        "serialized_named_tensors": [serialized] * n_ranks, "load_format": "flattened_bucket",
                        "flush_cache": False, "weight_version": str(version),
                    },
                )
            keep = (keep + [flat])[-2:]
            sent += len(meta)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return sent

    def _write_disk_version(self, buckets: Iterator[list[tuple[str, Tensor]]], version: int) -> tuple[Path, int]:
        from safetensors.torch import save_file

        if self.disk_dir is None:
            self.disk_dir = Path(tempfile.mkdtemp(prefix="uniopd-weights-"))
        version_dir = self.disk_dir / f"weights_v{version}"
        if version_dir.exists():
            shutil.rmtree(version_dir)
        version_dir.mkdir(parents=True)
        if self.model_dir is not None:
            for name in ("config.json", "generation_config.json"):
                if (self.model_dir / name).is_file():
                    shutil.copy2(self.model_dir / name, version_dir / name)
        sent = 0
        for k, bucket in enumerate(buckets):
            # clone: tied parameters share storage, which safetensors refuses to write.
            tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in bucket}
            save_file(tensors, str(version_dir / f"model-{k + 1:05d}.safetensors"), metadata={"format": "pt"})
            sent += len(tensors)
        return version_dir, sent

    def _drop_previous_disk_version(self, current: Path) -> None:
        previous, self._last_disk_version = self._last_disk_version, current
        if previous is not None and previous != current:
            shutil.rmtree(previous, ignore_errors=True)

    # ---- shutdown ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Leave the weight-update group and stop the servers this engine launched."""
        if self._group is not None:
            for server in self.servers:
                try:
                    self._call(server, "/destroy_weights_update_group", {"group_name": self.group_name})
                except SGLangRequestError as err:  # the server may be gone already
                    logger.warning("%s", err)
            destroy_weight_update_group(self._group)
            self._group = None
        for handle in self.handles:
            handle.shutdown()
        self.handles = []

    def __enter__(self) -> "SGLangRolloutEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _results(futures: list[Future]) -> list[Any]:
    """Wait for all futures (none is left running unobserved), then raise the first error."""
    errors, out = [], []
    for f in futures:
        try:
            out.append(f.result())
        except BaseException as err:  # collected, re-raised below
            errors.append(err)
    if errors:
        raise errors[0]
    return out
