"""The JAX sampler behind the subset of vLLM's OpenAI-compatible HTTP API that ToolGRPO uses.

    python -m toolgrpo.agents.serve MODEL_DIR --port 8000 --enable-lora --max-lora-rank 128

Any OpenAI-compatible client can query a (trained) model locally through it, and the VLLMSampler's
tests run against it with no GPU. It takes `vllm serve`'s flags (those it does not need are
accepted and ignored) so that `toolgrpo.agents.vllm_server.VLLMServer` launches either.

Endpoints (as vLLM answers them):
* GET /health, GET /v1/models (the base model and every loaded adapter, with "parent")
* POST /v1/completions: prompt as text, token ids or a list of either; max_tokens, temperature,
  top_p, top_k, n, stop, seed, logprobs; vLLM's extras return_token_ids,
  return_tokens_as_token_ids, include_stop_str_in_output, skip_special_tokens. Each choice holds
  "token_ids" and "logprobs" ({"tokens", "token_logprobs", "top_logprobs": null, "text_offset"}).
  finish_reason is "stop" (stop_reason: the stop string, or null at end of sequence) or "length".
* POST /v1/load_lora_adapter {"lora_name", "lora_path"} (a PEFT adapter directory),
  POST /v1/unload_lora_adapter {"lora_name"}.
Errors are JSON {"object": "error", "message", "type", "code"} with the HTTP status.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from flax import nnx

from toolgrpo.agents.sampler import JaxSampler
from toolgrpo.agents.sampling import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.kind = status, kind


class CompletionService:
    """The model, its adapters and the requests' logic, apart from HTTP."""

    def __init__(
        self,
        model,
        tokenizer,
        model_name: str,
        max_lora_rank: int = 0,
        eos_token_ids=None,
        model_root: str = "",
    ):
        self.base, self.tokenizer, self.name = model, tokenizer, model_name
        self.max_lora_rank, self.root = max_lora_rank, model_root
        eos = eos_token_ids or [
            t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None
        ]
        self.samplers = {model_name: JaxSampler(model, tokenizer, eos_token_ids=eos)}
        self.adapters: dict[str, str] = {}
        self.lock = threading.Lock()  # one generation at a time on the device
        self.created = int(time.time())

    def models(self) -> dict:
        data = [
            {
                "id": self.name,
                "object": "model",
                "created": self.created,
                "owned_by": "toolgrpo",
                "root": self.root,
                "parent": None,
                "max_model_len": self.base.config.max_position_embeddings,
            }
        ]
        data += [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "toolgrpo",
                "root": path,
                "parent": self.name,
            }
            for name, path in self.adapters.items()
        ]
        return {"object": "list", "data": data}

    def load_adapter(self, body: dict) -> str:
        from toolgrpo.learners.lora import load_peft_adapter

        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            raise APIError(400, "both 'lora_name' and 'lora_path' must be provided")
        if not self.max_lora_rank:
            raise APIError(400, "LoRA is not enabled: start the server with --enable-lora")
        if name in self.samplers:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.")
        try:
            with open(os.path.join(path, "adapter_config.json")) as f:
                rank = int(json.load(f)["r"])
            if rank > self.max_lora_rank:
                raise APIError(
                    400, f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}"
                )
            model = load_peft_adapter(nnx.clone(self.base), path)
        except APIError:
            raise
        except (OSError, KeyError, ValueError) as exc:
            raise APIError(
                404 if isinstance(exc, OSError) else 400,
                f"cannot load LoRA adapter '{name}' from {path}: {exc}",
                "NotFoundError" if isinstance(exc, OSError) else "BadRequestError",
            ) from exc
        base = self.samplers[self.name]
        with self.lock:
            self.samplers[name] = JaxSampler(model, self.tokenizer, eos_token_ids=base.eos)
            self.adapters[name] = path
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, body: dict) -> str:
        name = body.get("lora_name")
        if name not in self.adapters:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        with self.lock:
            del self.samplers[name], self.adapters[name]
        return f"Success: LoRA adapter '{name}' removed successfully."

    def _prompts(self, prompt) -> list[list[int]]:
        if (
            isinstance(prompt, str)
            or isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) for t in prompt)
        ):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise APIError(400, "prompt must be a string, a list of token ids, or a list of those")
        out = []
        for p in prompt:
            if isinstance(p, str):
                p = self.tokenizer.encode(p, add_special_tokens=False)
            if not isinstance(p, list) or not p or not all(isinstance(t, int) for t in p):
                raise APIError(400, "every prompt needs at least one token")
            vocab = self.base.config.vocab_size
            if any(not 0 <= t < vocab for t in p):
                raise APIError(400, f"token ids must be in [0, {vocab})")
            out.append(p)
        return out

    def complete(self, body: dict) -> dict:
        name = body.get("model", self.name)
        sampler = self.samplers.get(name)
        if sampler is None:
            raise APIError(404, f"The model `{name}` does not exist.", "NotFoundError")
        if body.get("echo") or body.get("best_of", 1) not in (1, None) or body.get("suffix"):
            raise APIError(400, "echo, best_of and suffix are not supported")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        top_k = int(body.get("top_k") or 0)
        try:
            params = SamplingParams(
                n=int(body.get("n", 1)),
                temperature=float(body.get("temperature", 1.0)),
                top_p=float(body.get("top_p", 1.0)),
                top_k=max(top_k, 0),
                max_new_tokens=int(body.get("max_tokens") or 16),
                stop=tuple(stop),
                seed=int(body["seed"])
                if body.get("seed") is not None
                else int.from_bytes(os.urandom(4), "little"),
            )
        except (TypeError, ValueError) as exc:
            raise APIError(400, str(exc)) from exc
        prompts = self._prompts(body.get("prompt"))
        with self.lock:
            try:
                groups = sampler.generate(prompts, params)
            except ValueError as exc:
                raise APIError(400, str(exc)) from exc
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        skip = body.get("skip_special_tokens", True)
        keep_stop = body.get("include_stop_str_in_output", False)
        choices, generated = [], 0
        for group in groups:
            for s in group:
                text = self.tokenizer.decode(s.token_ids, skip_special_tokens=skip)
                stop_reason = None
                if s.finish_reason == "stop":
                    stop_reason = next((x for x in stop if x in text), None)
                    if not keep_stop and stop_reason is not None:
                        text = text[: text.index(stop_reason)]
                pieces = [
                    f"token_id:{t}" if as_ids else self.tokenizer.decode([t]) for t in s.token_ids
                ]
                offsets = [0, *itertools.accumulate(map(len, pieces))][: len(pieces)]
                choice = {
                    "index": len(choices),
                    "text": text,
                    "finish_reason": "length" if s.finish_reason == "length" else "stop",
                    "stop_reason": stop_reason,
                    "token_ids": list(s.token_ids),
                    "logprobs": None,
                }
                if body.get("logprobs") is not None:
                    choice["logprobs"] = {
                        "tokens": pieces,
                        "token_logprobs": list(s.logprobs),
                        "top_logprobs": None,
                        "text_offset": offsets,
                    }
                choices.append(choice)
                generated += len(s.token_ids)
        n_prompt = sum(map(len, prompts))
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": choices,
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": generated,
                "total_tokens": n_prompt + generated,
            },
        }


def make_handler(service: CompletionService):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # quiet: one line per error only
            pass

        def _send(self, status: int, payload) -> None:
            raw = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header(
                "Content-Type", "text/plain" if isinstance(payload, str) else "application/json"
            )
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _error(self, status: int, message: str, kind: str) -> None:
            self._send(
                status,
                {
                    "object": "error",
                    "message": message,
                    "type": kind,
                    "param": None,
                    "code": status,
                },
            )

        def do_GET(self):
            if self.path == "/health":
                self._send(200, "")
            elif self.path == "/v1/models":
                self._send(200, service.models())
            else:
                self._error(404, f"no route {self.path}", "NotFoundError")

        def do_POST(self):
            routes = {
                "/v1/completions": service.complete,
                "/v1/load_lora_adapter": service.load_adapter,
                "/v1/unload_lora_adapter": service.unload_adapter,
            }
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path not in routes:
                    raise APIError(404, f"no route {self.path}", "NotFoundError")
                if not isinstance(body, dict):
                    raise APIError(400, "the request body must be a JSON object")
                self._send(200, routes[self.path](body))
            except json.JSONDecodeError as exc:
                self._error(400, f"invalid JSON: {exc}", "BadRequestError")
            except APIError as exc:
                self._error(exc.status, str(exc), exc.kind)
            except Exception as exc:  # noqa: BLE001 - a bad request must not kill the server
                self._error(500, f"{type(exc).__name__}: {exc}", "InternalServerError")

    return Handler


def serve(service: CompletionService, host: str = "127.0.0.1", port: int = 8000):
    """A started ThreadingHTTPServer (call .shutdown() to stop it); port 0 picks a free one."""
    server = ThreadingHTTPServer((host, port), make_handler(service))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="toolgrpo-serve").start()
    return server


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="a Hugging Face Qwen2 directory or hub id")
    parser.add_argument(
        "--model",
        dest="model_flag",
        default=None,
        help="the same, as vLLM's API server module takes it",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--tokenizer", default=None, help="default: the model's")
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    for flag in (
        "--max-loras",
        "--generation-config",
        "--gpu-memory-utilization",
        "--max-model-len",
    ):  # vLLM flags with a value that this server has no use for
        parser.add_argument(flag, default=None, help="accepted for vLLM's sake; not used")
    args, ignored = parser.parse_known_args(argv)
    args.model = args.model or args.model_flag
    if not args.model:
        parser.error("give the model (positional or --model)")
    import jax.numpy as jnp

    from toolgrpo.learners.params import from_pretrained
    from toolgrpo.learners.tokenizer import load_tokenizer

    model = from_pretrained(args.model, dtype=getattr(jnp, args.dtype))
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    service = CompletionService(
        model,
        tokenizer,
        args.served_model_name or args.model,
        args.max_lora_rank if args.enable_lora else 0,
        model_root=args.model,
    )
    server = serve(service, args.host, args.port)
    note = f" (ignored vllm flags: {' '.join(ignored)})" if ignored else ""
    print(f"serving {service.name} on http://{args.host}:{server.server_port}{note}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
