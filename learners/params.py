"""Hugging Face <-> NNX: tensor names, safetensors files (sharded or not), hub downloads.

    from toolgrpo.learners.params import from_pretrained, save_pretrained

    model = from_pretrained("Qwen/Qwen2.5-0.5B-Instruct", dtype=jnp.bfloat16)  # or a directory
    save_pretrained(model, "out/model")      # config.json + model.safetensors

Hugging Face stores a linear layer's weight as [out, in]; nnx.Linear's kernel is [in, out]. Every
other tensor keeps its shape. This module depends on learners/qwen2.py, never the other way round.
"""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from toolgrpo.hub import HubUnavailableError
from toolgrpo.learners.qwen2 import Qwen2ForCausalLM
from toolgrpo.learners.qwen2_config import Qwen2Config

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def resolve(path_or_id: str) -> str:
    """A local directory for `path_or_id`: itself, or the hub snapshot (downloaded or cached)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id) or path_or_id.startswith((".", "/")):
        raise FileNotFoundError(f"{path_or_id!r} is not a model directory")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path_or_id, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # noqa: BLE001 - offline errors come in several types
        try:
            return snapshot_download(path_or_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
        except Exception:  # noqa: BLE001, S110 - the hub's error, not the cache's, is reported
            pass
        cause = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        raise HubUnavailableError(
            f"cannot load {path_or_id!r}: the Hugging Face Hub is unreachable and the model is "
            f"not in the local cache ({cause})",
            "Offline, pass a local directory holding config.json and *.safetensors (for example "
            "one written by save_pretrained).",
        ) from None


def hf_name(path: tuple) -> tuple[str, bool]:
    """The Hugging Face tensor name of an NNX parameter path, and whether it is transposed."""
    parts = [str(p) for p in path]
    if parts[:1] == ["embed_tokens"]:
        return "model.embed_tokens.weight", False
    if parts[:1] == ["lm_head"]:
        return "lm_head.weight", True
    if parts[:1] == ["norm"]:
        return "model.norm.weight", False
    if parts[0] == "layers":
        *mods, leaf = parts[1:]
        # LoRA wraps a projection: its base layer's parameters keep the plain name
        mods = [m for m in mods if m != "base"]
        if leaf == "kernel":
            return "model.layers." + ".".join(mods) + ".weight", True
        if leaf == "bias":
            return "model.layers." + ".".join(mods) + ".bias", False
        return "model.layers." + ".".join(mods) + "." + leaf, False
    raise KeyError(f"no Hugging Face name for parameter {'.'.join(parts)}")


def _base_params(model) -> dict:
    """{path: Variable} of the model's own (non-LoRA) parameters."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return dict(nnx.to_flat_state(state))


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(
            f
            for f in os.listdir(directory)
            if f.endswith(".safetensors") and not f.startswith("adapter_")
        )
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory!r}")
    tensors = {}
    for name in files:
        with safe_open(os.path.join(directory, name), framework="flax") as f:
            for key in f.keys():  # noqa: SIM118 - a safe_open has keys() but is not iterable
                tensors[key] = f.get_tensor(key)
    return tensors


REQUIRED_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
"""config.json keys without which a model's shapes are unknown (never filled with defaults)."""


def read_model_config(directory: str) -> dict:
    """A model directory's config.json, checked: it parses, has REQUIRED_CONFIG_KEYS, and the
    directory holds safetensors weights. Errors name the file and what is wrong."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{directory}: no config.json (a model directory holds config.json "
            "and *.safetensors, as save_pretrained writes them)"
        )
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    if not any(name.endswith(".safetensors") for name in os.listdir(directory)):
        raise FileNotFoundError(f"{directory}: no *.safetensors weights")
    return config


def from_pretrained(
    path_or_id: str, dtype=jnp.float32, param_dtype=None, remat: bool = False, **options
) -> Qwen2ForCausalLM:
    """Load a Hugging Face Qwen2 checkpoint (a local directory or a hub id), sharded or not,
    bf16 or fp32. `dtype` is the computation's, `param_dtype` the parameters' (default: `dtype`);
    `remat` recomputes each layer's activations in the backward pass; `options` are the model's
    other settings (scan_layers, attention, attention_block). Raises HubUnavailableError for a
    hub id that can be neither downloaded nor found in the cache."""
    param_dtype = param_dtype or dtype
    directory = resolve(path_or_id)
    cfg = Qwen2Config.from_hf_config(read_model_config(directory))
    model = nnx.eval_shape(
        lambda: Qwen2ForCausalLM(
            cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0), **options
        )
    )
    tensors = read_safetensors(directory)
    used = set()
    for path, var in _base_params(model).items():
        name, transposed = hf_name(path)
        if name not in tensors:
            raise KeyError(f"{directory}: tensor {name!r} is missing")
        value = jnp.asarray(tensors[name])
        if not bool(jnp.isfinite(value).all()):  # one reduction a tensor: NaN weights train NaN
            raise ValueError(f"{directory}: tensor {name!r} holds NaN or inf values")
        value = value.T if transposed else value
        if value.shape != var.get_value().shape:
            raise ValueError(
                f"{name}: shape {value.shape} does not match the config's {var.get_value().shape}"
            )
        var.set_value(value.astype(param_dtype))
        used.add(name)
    unused = set(tensors) - used - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    unused = {n for n in unused if not re.search(r"rotary_emb\.inv_freq$", n)}
    if unused:
        raise ValueError(f"{directory}: tensors not used by the model: {sorted(unused)[:5]}")
    return model


def save_pretrained(model: Qwen2ForCausalLM, directory: str) -> None:
    """Write config.json and model.safetensors in the Hugging Face format (LoRA adapters, if any,
    are left out: merge_lora first to keep them, or save them with save_peft_adapter)."""
    from safetensors.flax import save_file

    os.makedirs(directory, exist_ok=True)
    dtype = model.embed_tokens.embedding.get_value().dtype
    with open(os.path.join(directory, "config.json"), "w") as f:
        hf = model.config.to_hf_config()
        hf["torch_dtype"] = "bfloat16" if dtype == jnp.bfloat16 else "float32"
        json.dump(hf, f, indent=2)
    tensors = {}
    for path, var in _base_params(model).items():
        name, transposed = hf_name(path)
        value = var.get_value()
        tensors[name] = jnp.asarray(value.T if transposed else value)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
