"""Checks of what a run reads, made before anything loads, shared by the main job and
experiments/evaluate.py. Each raises a ValueError or FileNotFoundError whose message names the
input, what is wrong and the fix; `bad_input()` turns them into the InputError that `train`
raises (toolgrpo.agents.training.errors), and an entry point prints its one line:

    check_finite(dataclasses.asdict(cfg))       # no NaN or inf in any setting
    config = check_model(directory)             # config.json and every safetensors header
    tokenizer = check_tokenizer(name, config)   # present, with a chat template, of the model's size
    check_context_length(config, tokens)        # an episode's budget fits the model's positions
    check_sampler(urls, engine)                 # vLLM installed, or its URLs well-formed and up
    check_adapter(directory)                    # a PEFT LoRA adapter's files, whole
    check_inputs(cfg, engine)                   # all of a run's inputs, the context budget too
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from toolgrpo.agents.training.errors import HubUnreachable, InputError

if TYPE_CHECKING:
    from toolgrpo.agents.rollout import RolloutConfig
    from toolgrpo.agents.training.config import Config

logger = logging.getLogger(__name__)

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
    """A model directory's config.json (toolgrpo.learners.params.read_model_config's checks) and the
    header of every safetensors file: a truncated or corrupt file is named before the weights
    load. Returns the config."""
    from safetensors import SafetensorError, safe_open

    from toolgrpo.learners.params import read_model_config

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
    from toolgrpo.learners.params import resolve
    from toolgrpo.learners.tokenizer import load_tokenizer

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
    (toolgrpo.learners.lora.load_peft_adapter checks the rest against the model: its kind, its shapes and
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


@contextlib.contextmanager
def bad_input():
    """The checks' ValueError, FileNotFoundError and NotImplementedError as an InputError of
    their first line (the original its __cause__); a hub that cannot be reached as
    HubUnreachable."""
    from toolgrpo.hub import HubUnavailableError

    try:
        yield
    except InputError:
        raise
    except HubUnavailableError as exc:
        raise HubUnreachable(exc.reason) from exc
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        text = str(exc).strip()
        raise InputError(text.splitlines()[0] if text else type(exc).__name__) from exc


def check_context_budget(env, tokenizer, indices, rollout: RolloutConfig) -> None:
    """A prompt that fills rollout.max_total_tokens leaves nothing to sample: refuse such a
    budget (and warn when the first turn gets less than its max_turn_tokens)."""
    from toolgrpo.agents.chat import longest_prompt

    budget, turn = rollout.max_total_tokens, rollout.max_turn_tokens
    tokens, problem_id = longest_prompt(env, tokenizer, indices)
    if tokens >= budget:
        raise ValueError(
            f"--rollout.max-total-tokens {budget} leaves no room to answer: the prompt of "
            f"{problem_id} is {tokens} tokens; raise it above {tokens} (to {tokens + turn} for "
            "one full turn)"
        )
    if tokens + turn > budget:
        logger.warning(
            "the prompt of %s is %d tokens, so its first turn gets %d of "
            "--rollout.max-turn-tokens %d",
            problem_id,
            tokens,
            budget - tokens,
            turn,
        )


def check_inputs(cfg: Config, engine: str):
    """Everything a run reads, checked before the model loads (a ValueError or
    FileNotFoundError otherwise): the model's config and weight files, the
    tokenizer, the rollout engine, the environment and both problem sets, the context budget.
    Returns (the tokenizer, training problems, evaluation problems)."""
    import gymnasium as gym

    import toolgrpo.envs
    from toolgrpo.envs.toolmath import problems_of
    from toolgrpo.learners.params import resolve

    model_config = check_model(resolve(cfg.model.name))
    tokenizer = check_tokenizer(cfg.model.name, model_config)
    check_context_length(model_config, cfg.rollout.max_total_tokens)
    check_sampler(cfg.sampler.vllm_url, engine)
    if cfg.env.env_id not in toolgrpo.envs.ENV_IDS:
        raise ValueError(
            f"--env.env-id {cfg.env.env_id!r} is not one of {', '.join(toolgrpo.envs.ENV_IDS)}"
        )
    sizes = []
    for split in ("train", "test"):
        probe = gym.make(cfg.env.env_id, **cfg.env.env_kwargs(split))  # loads the problems now
        sizes.append(len(problems_of(probe)))
        check_context_budget(probe, tokenizer, range(min(sizes[-1], 4096)), cfg.rollout)
        probe.close()
    if cfg.problems_per_step > sizes[0]:
        raise ValueError(
            f"--problems-per-step {cfg.problems_per_step} is more than the {sizes[0]} training "
            "problems"
        )
    return tokenizer, sizes[0], min(sizes[1], cfg.eval.limit or 10**9)
