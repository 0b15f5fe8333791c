"""Checks of what a run reads, made before anything loads, shared by the main job and
experiments/evaluate.py. Each raises a ValueError or FileNotFoundError whose message names the
input, what is wrong and the fix (`one_line_errors` prints it as one line):

    check_finite(dataclasses.asdict(cfg))       # no NaN or inf in any setting
    config = check_model(directory)             # config.json and every safetensors header
    tokenizer = check_tokenizer(name, config)   # present, with a chat template, of the model's size
    check_context_length(config, tokens)        # an episode's budget fits the model's positions
    check_sampler(urls, engine)                 # vLLM installed, or its URLs well-formed and up
    check_adapter(directory)                    # a PEFT LoRA adapter's files, whole
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

VOCAB_SLACK = 0.1
"""How much smaller than the model's embedding a tokenizer's vocabulary may be: checkpoints pad
their embedding to a round size (Qwen2.5's 151,936 rows hold 151,665 tokens, 0.2% unused), but a
tokenizer with a tenth fewer tokens is not the model's."""


def check_finite(settings: dict[str, Any], prefix: str = "") -> None:
    """Every float in the nested settings (dataclasses.asdict of a config) is finite: a NaN
    learning rate trains an adapter of NaNs, an infinite temperature samples noise."""
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            check_finite(value, f"{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} is {value}: every numeric setting must be finite")


def check_model(directory: str) -> dict:
    """A model directory's config.json (learners.params.read_model_config's checks) and the
    header of every safetensors file: a truncated or corrupt file is named before the weights
    load. Returns the config."""
    from safetensors import SafetensorError, safe_open

    from learners.params import read_model_config

    config = read_model_config(directory)
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".safetensors") or name.startswith("adapter_"):
            continue
        path = os.path.join(directory, name)
        try:
            with safe_open(path, framework="numpy") as f:
                f.keys()
        except SafetensorError as exc:
            raise ValueError(
                f"{path} is truncated or corrupt ({exc}); download or save the model again"
            ) from None
    return config


def check_tokenizer(name_or_dir: str, model_config: dict):
    """The model's tokenizer, loaded and checked: a directory without tokenizer.json (or the
    slow tokenizer's vocab.json and merges.txt) would give a tokenizer of special tokens only,
    which trains on empty prompts; the chat template must be present, and the vocabulary must
    fit the embedding (no id beyond it, at most VOCAB_SLACK fewer tokens)."""
    from learners.params import resolve
    from learners.tokenizer import load_tokenizer

    directory = resolve(name_or_dir)
    files = set(os.listdir(directory))
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        raise FileNotFoundError(
            f"{directory}: no tokenizer.json (nor vocab.json and merges.txt); copy the model's "
            "tokenizer files beside its weights (tokenizer.save_pretrained(DIR))"
        )
    tokenizer = load_tokenizer(name_or_dir)
    if not tokenizer.chat_template:
        raise ValueError(
            f"{directory}: the tokenizer has no chat template (tokenizer_config.json's "
            "chat_template, or chat_template.jinja); use the instruct model's tokenizer files"
        )
    tokens, rows = len(tokenizer), int(model_config["vocab_size"])
    if tokens > rows or tokens < (1 - VOCAB_SLACK) * rows:
        raise ValueError(
            f"{directory}: the tokenizer has {tokens} tokens but the model's embedding {rows} "
            "rows: it is not this model's tokenizer"
        )
    return tokenizer


def check_context_length(model_config: dict, max_total_tokens: int) -> None:
    """An episode's token budget fits the model's positions (config.json's
    max_position_embeddings, where it says)."""
    positions = model_config.get("max_position_embeddings")
    if positions and max_total_tokens > positions:
        raise ValueError(
            f"--rollout.max-total-tokens {max_total_tokens} is more than the model's "
            f"{positions} positions (max_position_embeddings): lower it to at most {positions}"
        )


def check_url(url: str, flag: str = "--sampler.vllm-url") -> None:
    """`url` is an http(s) URL with a host."""
    parts = urllib.parse.urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{flag} {url!r} is not an http(s) URL (like http://127.0.0.1:8000)")
    try:
        parts.port  # noqa: B018 - parsing the port raises for a bad one
    except ValueError:
        raise ValueError(f"{flag} {url!r} has a bad port") from None


def check_server(url: str, timeout_s: float = 10.0, flag: str = "--sampler.vllm-url") -> None:
    """A server with vLLM's OpenAI-compatible API answers at `url` (GET /v1/models)."""
    check_url(url, flag)
    base = url.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(base + "/v1/models", timeout=timeout_s) as response:
            json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(
            f"{flag} {url}: no vLLM server answers there ({reason}); start one with `vllm serve "
            "MODEL --enable-lora`, or leave the flag out to launch one"
        ) from None


def check_vllm_installed() -> None:
    """vLLM can be imported (the job launches its server)."""
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "--sampler.engine vllm: vLLM is not installed; install it with `uv sync --extra "
            "vllm` (a GPU machine), give a running server with --sampler.vllm-url, or use "
            "--sampler.engine jax"
        )


def check_sampler(vllm_urls: tuple[str, ...], engine: str) -> None:
    """The rollout engine can run: the given vLLM servers answer, or vLLM is installed for the
    one the job launches."""
    for url in vllm_urls:
        check_server(url)
    if engine == "vllm" and not vllm_urls:
        check_vllm_installed()


def check_adapter(directory: str) -> None:
    """A PEFT LoRA adapter directory whose files are present and whole
    (learners.lora.load_peft_adapter checks the rest against the model: its kind, its shapes and
    that its values are finite)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--adapter {directory} is not a directory")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not os.path.exists(os.path.join(directory, name)):
            raise FileNotFoundError(
                f"--adapter {directory} has no {name} (a PEFT adapter, like a run's adapter/)"
            )
    try:
        with open(os.path.join(directory, "adapter_config.json")) as f:
            json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{directory}/adapter_config.json is not valid JSON ({exc})") from None
    path = os.path.join(directory, "adapter_model.safetensors")
    try:
        with safe_open(path, framework="numpy") as f:
            f.keys()
    except SafetensorError as exc:
        raise ValueError(f"{path} is truncated or corrupt ({exc})") from None
