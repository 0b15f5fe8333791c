"""VLLMSampler: samples through a vLLM server's OpenAI-compatible API; the errors it raises.

    with VLLMServer("Qwen/Qwen2.5-0.5B-Instruct", max_lora_rank=128) as server:
        sampler = VLLMSampler(server.url, tokenizer, server=server)  # server: toolgrpo.agents.vllm_server
        sampler.sync_adapter(model, version=1)           # PEFT files -> /v1/load_lora_adapter
        groups = sampler.generate(prompts, SamplingParams(n=8, stop=("</tool_call>",)))

Prompts go as token ids to /v1/completions and the sampled token ids come back with their
log-probabilities, so nothing is re-tokenized. Each learner update becomes a new adapter named
"<prefix>-<client>-v<version>" (the previous one is unloaded; <client> is unique to each
VLLMSampler, since vLLM caches adapters by name and a server may outlive a run or serve several);
every sample records the version that made it, and asking for any other version raises
StaleAdapterError instead of silently sampling the base model. Version 0 is the base model (a
fresh LoRA adapter is the identity).

Transient failures (connection refused or reset, timeouts, HTTP 5xx) are retried with exponential
backoff; then ServerError (ServerUnreachable when nothing answered) says which server, what failed
and how to start one. After such a failure `recover()` brings the server back: it restarts the
server this job launched (`server`), or waits, with backoff up to `recover_s`, for one given by
URL, and reloads the adapter the sampler held (ServerDown when it does not come back); the
training loop then replays the failed collection (toolgrpo.agents.training.loop).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from toolgrpo.agents.sampling import Sample, SamplingParams, check_per_prompt

if TYPE_CHECKING:
    from toolgrpo.agents.vllm_server import VLLMServer

logger = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The server is unreachable, lacks a feature, or answered with an error (HTTP `status`)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ServerUnreachable(ServerError):
    """Nothing answered (connection refused or reset, a timeout) in any of a request's tries."""


class ServerDown(ServerError):
    """A server that failed did not come back (`VLLMSampler.recover` gave up)."""


class StaleAdapterError(ServerError):
    """A request named an adapter version the server does not hold."""


class AdapterLostError(StaleAdapterError):
    """The server no longer holds the adapter the sampler loaded on it (it restarted)."""


def recoverable(exc: BaseException) -> ServerError | None:
    """The server fault behind `exc` (itself or a cause) that `recover()` may mend: a server
    that did not answer, answered 5xx every time, or lost its adapter; None otherwise."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, (ServerUnreachable, AdapterLostError)) or (
            isinstance(cause, ServerError) and (cause.status or 0) >= 500
        ):
            return cause
        cause = cause.__cause__
    return None


class VLLMSampler:
    """A client of vLLM's OpenAI-compatible server (or toolgrpo.agents.serve), with versioned adapters."""

    def __init__(
        self,
        base_url: str,
        tokenizer,
        model: str | None = None,
        timeout_s: float = 600.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        adapter_prefix: str = "toolgrpo",
        adapter_dir: str | None = None,
        server: VLLMServer | None = None,
        recover_s: float = 60.0,
    ):
        self.url = base_url.rstrip("/").removesuffix("/v1")
        self.tokenizer, self.timeout_s = tokenizer, timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.server = server
        """The server at `base_url` when this job launched it: recover() restarts it."""
        self.recover_s = recover_s
        """How long recover() waits for a server given by URL to answer again."""
        self.prefix = f"{adapter_prefix}-{uuid.uuid4().hex[:8]}"
        self.adapter_dir = adapter_dir or tempfile.mkdtemp(prefix="toolgrpo-adapters-")
        models = self._request("GET", "/v1/models")["data"]
        bases = [m["id"] for m in models if not m.get("parent")]
        if model is None and not bases:
            raise ServerError(f"{self.url}/v1/models lists no base model")
        self.model = model or bases[0]
        self.adapter_version = 0
        self._adapter: str | None = None
        self._adapter_path: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="vllm-request")

    # -- HTTP -------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(
                self.url + path,
                data=data,
                method=method,
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read().decode()
                    if "json" in resp.headers.get("Content-Type", ""):
                        return json.loads(raw)
                    return raw
            except urllib.error.HTTPError as exc:
                message = _error_message(exc)
                if exc.code >= 500:
                    last = ServerError(
                        f"{self.url}{path}: HTTP {exc.code} ({attempt + 1} tries): {message}",
                        exc.code,
                    )
                    continue
                raise ServerError(
                    f"{self.url}{path}: HTTP {exc.code}: {message}", exc.code
                ) from None
            except (
                urllib.error.URLError,
                ConnectionError,
                TimeoutError,
                http.client.HTTPException,  # a reply cut short: the server died while answering
            ) as exc:
                last = exc
        if isinstance(last, ServerError):  # it answered, with an error every time
            raise last
        raise ServerUnreachable(
            f"the vLLM server at {self.url} is unreachable ({path}, {self.retries + 1} tries): "
            f"{last}. Start one with `python -m vllm.entrypoints.openai.api_server --model MODEL "
            "--enable-lora --max-lora-rank R` (toolgrpo.agents.vllm_server.VLLMServer does), or use the "
            "JAX sampler."
        )

    # -- adapters ---------------------------------------------------------------------------------
    def load_adapter(self, path: str, version: int) -> str:
        """Load the PEFT adapter at `path` as `version`, then unload the previous one (nothing
        when the server holds that version already)."""
        name = f"{self.prefix}-v{version}"
        if name == self._adapter:
            return name
        try:
            self._request(
                "POST",
                "/v1/load_lora_adapter",
                {"lora_name": name, "lora_path": os.path.abspath(path)},
            )
        except ServerError as exc:
            said = str(exc).lower().partition("http 404: ")[2]
            no_route = "no route" in said or ("not found" in said and "adapter" not in said)
            if "greater than max_lora_rank" in str(exc):
                raise ServerError(
                    f"the server at {self.url} holds LoRA adapters of rank up to its "
                    "--max-lora-rank, below this adapter's: restart it with a larger one "
                    f"(VLLMServer(max_lora_rank=R) rounds R up to a rank vLLM accepts) ({exc})",
                    exc.status,
                ) from None
            if no_route or "not enabled" in str(exc):
                raise ServerError(
                    f"the server at {self.url} cannot load LoRA adapters at run time: start it "
                    "with --enable-lora --max-lora-rank R and the environment variable "
                    f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True ({exc})"
                ) from None
            raise
        previous, self._adapter, self.adapter_version = self._adapter, name, version
        self._adapter_path = os.path.abspath(path)
        if previous is not None:
            self._request("POST", "/v1/unload_lora_adapter", {"lora_name": previous})
        return name

    def sync_adapter(self, model, version: int) -> str:
        """Write the model's LoRA adapter in PEFT format and load it as `version`."""
        from toolgrpo.learners.lora import save_peft_adapter

        path = os.path.join(self.adapter_dir, f"v{version}")
        save_peft_adapter(model, path)
        name = self.load_adapter(path, version)
        for old in os.listdir(self.adapter_dir):  # the server has read it: keep only the newest
            if old != f"v{version}":
                shutil.rmtree(os.path.join(self.adapter_dir, old), ignore_errors=True)
        return name

    # -- recovery ---------------------------------------------------------------------------------
    def recover(self) -> None:
        """After a failed request: bring the server back with the adapter the sampler holds (the
        same name and version, reloaded from its files), so that a replayed collection samples
        what the failed one would have. A server this job launched (`server`) is restarted
        unless it answers; one given by URL is waited for, with backoff, up to `recover_s`.
        ServerDown when it does not come back."""
        if self.server is not None and not self._answers():
            logger.warning("the vLLM server at %s died: restarting it", self.url)
            try:
                self.server.restart()
            except ServerError as exc:
                raise ServerDown(f"the vLLM server at {self.url} could not restart: {exc}") from exc
        else:
            self._wait_until_it_answers()
        if (
            self._adapter is not None
            and self._adapter_path is not None
            and self._adapter not in self._served()
        ):
            logger.warning("reloading adapter %s onto %s", self._adapter, self.url)
            name, self._adapter = self._adapter, None  # the server lost it: load it afresh
            try:
                self.load_adapter(self._adapter_path, self.adapter_version)
            except ServerError as exc:
                self._adapter = name
                raise ServerDown(f"{self.url} could not reload adapter {name}: {exc}") from exc

    def _answers(self) -> bool:
        """Whether the server answers /v1/models now (one try)."""
        try:
            with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException):
            return False

    def _wait_until_it_answers(self) -> None:
        """Probe the server with exponential backoff (1 s, 2 s, 4 s, ...) for up to
        `recover_s`; ServerDown if it never answers."""
        deadline, delay, tries = time.monotonic() + self.recover_s, 1.0, 0
        while True:
            tries += 1
            if self._answers():
                if tries > 1:
                    logger.warning("the vLLM server at %s answers again", self.url)
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerDown(
                    f"the vLLM server at {self.url} did not answer again within "
                    f"{self.recover_s:g} s ({tries} tries)"
                )
            logger.warning("the vLLM server at %s does not answer; retrying", self.url)
            time.sleep(min(delay, left))
            delay *= 2

    def _served(self) -> set[str]:
        """The names of the models and adapters the server holds."""
        return {m["id"] for m in self._request("GET", "/v1/models")["data"]}

    # -- sampling ---------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        adapter_version: int | None = None,
        *,
        seeds: Sequence[int] | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        """`params.n` samples for each prompt, in prompt order: one request a prompt, sent at
        once (the server batches them continuously), each with its own seed (`seeds`, or
        derived from params.seed and the prompt's place) and budget (`max_new_tokens`)."""
        version = self.adapter_version if adapter_version is None else adapter_version
        if version != self.adapter_version:
            raise StaleAdapterError(
                f"adapter version {version} was requested but the server "
                f"holds version {self.adapter_version}: sync_adapter first"
            )
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        budgets = check_per_prompt(prompts, params, seeds, max_new_tokens)
        if seeds is None:  # one seed for several requests would make them one sample
            seeds = [hash((params.seed, i)) % 2**31 for i in range(len(prompts))]
        model = self._adapter or self.model
        jobs = [(list(map(int, p)), int(b), int(s)) for p, b, s in zip(prompts, budgets, seeds)]
        if len(jobs) == 1:
            return [self._complete(model, version, params, *jobs[0])]
        return list(self._pool.map(lambda job: self._complete(model, version, params, *job), jobs))

    def _complete(
        self,
        model: str,
        version: int,
        params: SamplingParams,
        prompt: list[int],
        max_tokens: int,
        seed: int,
    ) -> list[Sample]:
        """One request: `params.n` samples of one prompt. Every sampling field is sent, so
        that the server never fills one from the model's generation_config.json (a repetition
        penalty there would make the samples come from a distribution the learner never
        scores: the log-probabilities vLLM returns are the unpenalised ones)."""
        body = {
            "model": model,
            "prompt": prompt,
            "n": params.n,
            "max_tokens": max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k or -1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "stop": list(params.stop),
            "seed": seed,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
            "include_stop_str_in_output": True,
            "skip_special_tokens": True,
        }
        try:
            reply = self._request("POST", "/v1/completions", body)
        except ServerError as exc:
            if self._adapter and exc.status == 404:
                raise AdapterLostError(
                    f"the server at {self.url} no longer holds adapter "
                    f"{model!r} (restarted?); not falling back to the base "
                    "model"
                ) from None
            raise
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        if len(choices) != params.n:
            raise ServerError(f"{self.url} returned {len(choices)} choices for n={params.n}")
        return [self._sample(c, version, len(prompt)) for c in choices]

    def _sample(self, choice: dict, version: int, prompt_len: int) -> Sample:
        lp = choice.get("logprobs") or {}
        ids = choice.get("token_ids")
        if ids is None:  # older vLLM: "token_id:123" strings with return_tokens_as_token_ids
            ids = [int(t.split(":", 1)[1]) for t in lp.get("tokens", [])]
        logprobs = [float(x) for x in lp.get("token_logprobs", [])]
        if len(logprobs) != len(ids):
            raise ServerError(
                f"{self.url} returned {len(ids)} tokens but {len(logprobs)} log-probabilities"
            )
        reason = choice.get("finish_reason")
        finish = (
            "length"
            if reason == "length"
            else ("stop" if isinstance(choice.get("stop_reason"), str) else "eos")
        )
        return Sample(ids, logprobs, choice.get("text", ""), finish, version, prompt_len)


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read().decode() or "{}")
    except (ValueError, OSError):
        return exc.reason or ""
    err = body.get("error", body) if isinstance(body, dict) else {}
    return str(err.get("message", body)) if isinstance(err, dict) else str(err)
