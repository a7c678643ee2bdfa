"""Start SGLang HTTP servers as subprocesses, wait until they answer, stop them.

    handles = launch_servers("/ckpt/Qwen3-4B", num_engines=2, tp_size=2, log_dir="runs/x/sglang")
    wait_all_healthy(handles, timeout_s=900)
    ...
    shutdown_servers(handles)

Each engine is `python -m sglang.launch_server --model-path ... --host 127.0.0.1 --port P
--tp-size N --mem-fraction-static F --enable-memory-saver <extra args>`, with its own
CUDA_VISIBLE_DEVICES (engine i takes GPUs first_gpu + i*tp_size ... + tp_size - 1 of this node)
and its stdout and stderr in one log file. Servers bind to the loopback unless told otherwise
(DESIGN.md section 3). `--enable-memory-saver` lets a colocated engine release its weights and KV
cache while the learner trains (/release_memory_occupation).

Each server runs in its own session (process group) because SGLang forks scheduler and
detokenizer processes: stopping the group stops them too, and only them.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from uniopd_mcore.utils.http import HTTPRequestError, request

DEFAULT_COMMAND = (sys.executable, "-m", "sglang.launch_server")


class ServerLaunchError(RuntimeError):
    """A server exited, or did not become healthy in time; the message has its log tail."""


class ServerTimeoutError(ServerLaunchError, TimeoutError):
    pass


def client_host(host: str) -> str:
    """The address a client on this machine uses for a server bound to `host`."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def extra_args_to_flags(extra_args: Mapping[str, object] | None) -> list[str]:
    """{"chunked_prefill_size": "4096", "enable_deterministic_inference": "true"} ->
    ["--chunked-prefill-size", "4096", "--enable-deterministic-inference"].

    A value of true / "true" / "" is a bare switch; false / "false" / None leaves the flag out.
    """
    flags: list[str] = []
    for key, value in (extra_args or {}).items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        text = "" if value is None else str(value)
        if value is None or value is False or text.lower() == "false":
            continue
        if value is True or text == "" or text.lower() == "true":
            flags.append(flag)
        else:
            flags += [flag, text]
    return flags


def build_server_args(
    model_path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int,
    tp_size: int = 1,
    mem_fraction_static: float | None = 0.75,
    enable_memory_saver: bool = True,
    extra_args: Mapping[str, object] | None = None,
) -> list[str]:
    """The sglang.launch_server arguments of one engine (without the program itself)."""
    args = ["--model-path", os.fspath(model_path), "--host", host, "--port", str(port), "--tp-size", str(tp_size)]
    if mem_fraction_static is not None:
        args += ["--mem-fraction-static", str(mem_fraction_static)]
    if enable_memory_saver:
        args.append("--enable-memory-saver")
    return args + extra_args_to_flags(extra_args)


def engine_gpus(
    num_engines: int,
    tp_size: int,
    *,
    first_gpu: int = 0,
    gpus_per_node: int | None = None,
    visible: str | None = None,
) -> list[list[str]]:
    """GPU ids (as CUDA_VISIBLE_DEVICES entries) of each engine on this node.

    visible: this process's CUDA_VISIBLE_DEVICES, if set: local index k then means its k-th
    entry, so an engine lands on the GPUs the job was given, not on physical GPU k.
    """
    needed = first_gpu + num_engines * tp_size
    if gpus_per_node is not None and needed > gpus_per_node:
        raise ValueError(
            f"{num_engines} engines x tp_size {tp_size} from GPU {first_gpu} need {needed} GPUs, "
            f"this node has {gpus_per_node}; launch engines on other nodes yourself and pass their URLs"
        )
    ids = [s.strip() for s in visible.split(",") if s.strip()] if visible else None
    if ids is not None and needed > len(ids):
        raise ValueError(f"engines need GPUs 0..{needed - 1} but CUDA_VISIBLE_DEVICES={visible!r}")
    out = []
    for e in range(num_engines):
        local = range(first_gpu + e * tp_size, first_gpu + (e + 1) * tp_size)
        out.append([ids[k] if ids is not None else str(k) for k in local])
    return out


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((client_host(host), port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            last = deque(f, maxlen=lines)
    except OSError as err:
        return f"<log {path} unreadable: {err}>"
    return b"".join(last).decode("utf-8", errors="replace").rstrip()


# Every launched server until it is shut down (strong references: a handle dropped by its
# owner must still be stopped at exit).
_LIVE: set["ServerHandle"] = set()


@dataclass(eq=False)
class ServerHandle:
    """One launched server: its URL, process, log file and GPUs."""

    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    command: list[str]
    gpus: list[str] = field(default_factory=list)
    engine_index: int = 0

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def _describe(self) -> str:
        gpus = ",".join(self.gpus) or "-"
        return f"SGLang server {self.url} (engine {self.engine_index}, pid {self.process.pid}, GPUs {gpus})"

    def wait_healthy(self, timeout_s: float = 900.0, poll_s: float = 2.0) -> None:
        """Poll /health_generate (a real one-token generation; /health on servers without it)
        until it answers 200. Raises ServerLaunchError with the log tail when the process exits,
        ServerTimeoutError when `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        path = "/health_generate"
        last = "no answer yet"
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerLaunchError(
                    f"{self._describe()} exited with code {code} before it became healthy.\n"
                    f"Command: {' '.join(self.command)}\nLast lines of {self.log_path}:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            try:
                request(self.url + path, timeout=max(1.0, min(30.0, remaining)))
                return
            except HTTPRequestError as err:
                if err.status == 404 and path == "/health_generate":
                    path = "/health"
                    continue
                last = str(err)
            if time.monotonic() >= deadline:
                raise ServerTimeoutError(
                    f"{self._describe()} not healthy after {timeout_s:.0f} s (last check: {last}).\n"
                    f"Last lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    def shutdown(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `grace_s`."""
        _LIVE.discard(self)
        if self.process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # The leader may be gone while children linger: make sure the group is gone too.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def launch_servers(
    model_path: str | os.PathLike,
    num_engines: int = 1,
    tp_size: int = 1,
    host: str = "127.0.0.1",
    base_port: int = 30000,
    mem_fraction_static: float | None = 0.75,
    extra_args: Mapping[str, object] | None = None,
    gpus_per_node: int | None = None,
    log_dir: str | os.PathLike | None = None,
    *,
    first_gpu: int = 0,
    enable_memory_saver: bool = True,
    command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> list[ServerHandle]:
    """Start `num_engines` servers (engine i on port base_port + i); returns without waiting.

    command: the program to run instead of `python -m sglang.launch_server` (tests use a fake
    server script); the server arguments are appended to it unchanged.
    """
    if num_engines < 1 or tp_size < 1:
        raise ValueError(f"num_engines and tp_size must be >= 1, got {num_engines}, {tp_size}")
    program = list(command) if command is not None else list(DEFAULT_COMMAND)
    gpus = engine_gpus(
        num_engines, tp_size, first_gpu=first_gpu, gpus_per_node=gpus_per_node,
        visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    ports = [base_port + i for i in range(num_engines)]
    busy = [p for p in ports if not port_is_free(host, p)]
    if busy:
        raise ServerLaunchError(f"port(s) {busy} on {host} already in use; choose another base_port")
    log_root = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="uniopd-sglang-"))
    log_root.mkdir(parents=True, exist_ok=True)

    handles: list[ServerHandle] = []
    try:
        for i, port in enumerate(ports):
            argv = program + build_server_args(
                model_path, host=host, port=port, tp_size=tp_size,
                mem_fraction_static=mem_fraction_static, enable_memory_saver=enable_memory_saver,
                extra_args=extra_args,
            )
            child_env = dict(os.environ)
            child_env.update(env or {})
            child_env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i])
            log_path = log_root / f"sglang-engine{i}-port{port}.log"
            with open(log_path, "ab") as log:
                log.write(f"$ CUDA_VISIBLE_DEVICES={child_env['CUDA_VISIBLE_DEVICES']} {' '.join(argv)}\n".encode())
                log.flush()
                process = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=child_env, start_new_session=True,
                )
            handle = ServerHandle(
                url=f"http://{client_host(host)}:{port}", port=port, process=process,
                log_path=log_path, command=argv, gpus=gpus[i], engine_index=i,
            )
            handles.append(handle)
            _LIVE.add(handle)
    except BaseException:
        shutdown_servers(handles)
        raise
    return handles


def wait_all_healthy(handles: Sequence[ServerHandle], timeout_s: float = 900.0, poll_s: float = 2.0) -> None:
    """Wait for every server (they start in parallel, so one deadline serves all); on failure
    every server is stopped before the error propagates, so no half-started pool is left."""
    deadline = time.monotonic() + timeout_s
    try:
        for handle in handles:
            handle.wait_healthy(max(0.0, deadline - time.monotonic()), poll_s)
    except BaseException:
        shutdown_servers(handles)
        raise


def shutdown_servers(handles: Sequence[ServerHandle], grace_s: float = 30.0) -> None:
    for handle in handles:
        handle.shutdown(grace_s)


@atexit.register
def _stop_leftovers() -> None:
    # A crashed trainer must not leave GPU-holding servers behind.
    for handle in list(_LIVE):
        handle.shutdown(grace_s=5.0)
