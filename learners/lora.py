"""LoRA adapters on Qwen2's projections, saved and loaded exactly as PEFT does.

    apply_lora(model, rank=128, alpha=128)          # A random, B zero: the model is unchanged
    trainable = nnx.state(model, nnx.LoRAParam)     # only these train; the base stays frozen
    with lora_disabled(model): ref = model(ids)     # the base model (GRPO's reference)
    save_peft_adapter(model, "adapter/")            # adapter_model.safetensors + adapter_config.json
    load_peft_adapter(model, "adapter/")            # from this code, PEFT or anything PEFT-compatible
    merge_lora(model)                               # fold the adapter into the base weights

y = base(x) + (x A) B * scale with A: [in, r], B: [r, out] and scale = alpha / r (alpha / sqrt(r)
with rsLoRA). PEFT stores A^T as `...<proj>.lora_A.weight` [r, in] and B^T as `lora_B.weight`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION + MLP
PEFT_PREFIX = "base_model.model.model.layers"


class LoRALinear(nnx.Module):
    """A frozen nnx.Linear plus a low-rank update."""

    def __init__(
        self,
        base: nnx.Linear,
        rank: int,
        alpha: float,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        use_rslora: bool = False,
    ):
        din, dout = base.in_features, base.out_features
        bound = 1.0 / math.sqrt(din)  # PEFT: kaiming_uniform(a=sqrt(5)) on A
        self.base = base
        self.lora_a = nnx.LoRAParam(
            jax.random.uniform(rngs.params(), (din, rank), param_dtype, -bound, bound)
        )
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, dout), param_dtype))
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.enabled = True

    def __call__(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        dtype = y.dtype
        update = (x.astype(dtype) @ self.lora_a[...].astype(dtype)) @ self.lora_b[...].astype(dtype)
        return y + update * jnp.asarray(self.scale, dtype)


def _projections(model):
    """(layer index, module holding the projection, projection name) for every projection."""
    for i, layer in enumerate(model.layers):
        for name in ATTENTION:
            yield i, layer.self_attn, name
        for name in MLP:
            yield i, layer.mlp, name


def lora_modules(model) -> list[LoRALinear]:
    return [
        getattr(owner, name)
        for _, owner, name in _projections(model)
        if isinstance(getattr(owner, name), LoRALinear)
    ]


def apply_lora(
    model,
    rank: int = 128,
    alpha: float = 128.0,
    targets=ALL_TARGETS,
    rngs: nnx.Rngs | None = None,
    param_dtype=jnp.float32,
    use_rslora: bool = False,
):
    """Wrap the `targets` projections of every layer with LoRA, in place; returns the model."""
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown or not targets:
        raise ValueError(
            f"LoRA targets must be a non-empty subset of {ALL_TARGETS}, got {tuple(targets)}"
        )
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge_lora() first or reuse them")
    rngs = rngs or nnx.Rngs(params=0)
    for _, owner, name in _projections(model):
        if name in targets:
            setattr(
                owner,
                name,
                LoRALinear(
                    getattr(owner, name),
                    rank,
                    alpha,
                    rngs=rngs,
                    param_dtype=param_dtype,
                    use_rslora=use_rslora,
                ),
            )
    return model


@contextlib.contextmanager
def lora_disabled(model):
    """Within the block, the model computes as its base (adapters off)."""
    modules = lora_modules(model)
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


def merge_lora(model):
    """Fold every adapter into its base kernel and remove it, in place; returns the model."""
    for _, owner, name in _projections(model):
        module = getattr(owner, name)
        if isinstance(module, LoRALinear):
            kernel = module.base.kernel
            delta = (module.lora_a[...] @ module.lora_b[...]) * module.scale
            kernel.set_value((kernel[...].astype(jnp.float32) + delta).astype(kernel[...].dtype))
            setattr(owner, name, module.base)
    return model


def peft_config(model, base_model_name_or_path: str | None = None) -> dict:
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters: apply_lora() first")
    targets = sorted(
        {
            name
            for _, owner, name in _projections(model)
            if isinstance(getattr(owner, name), LoRALinear)
        }
    )
    first = modules[0]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.rank,
        "lora_alpha": first.alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": first.use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
    }


def save_peft_adapter(model, directory: str, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_model.safetensors and adapter_config.json in PEFT's layout (fp32)."""
    from safetensors.flax import save_file

    config = peft_config(model, base_model_name_or_path)
    tensors = {}
    for i, owner, name in _projections(model):
        module = getattr(owner, name)
        if isinstance(module, LoRALinear):
            group = "self_attn" if name in ATTENTION else "mlp"
            key = f"{PEFT_PREFIX}.{i}.{group}.{name}"
            tensors[f"{key}.lora_A.weight"] = jnp.asarray(module.lora_a[...].T, jnp.float32)
            tensors[f"{key}.lora_B.weight"] = jnp.asarray(module.lora_b[...].T, jnp.float32)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, ".adapter_model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, "adapter_model.safetensors"))  # atomic for a reader
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_peft_adapter(model, directory: str, param_dtype=jnp.float32):
    """Load a PEFT LoRA adapter into the model (applying LoRA first if it has none); returns it."""
    from safetensors import safe_open

    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError(
            f"{directory}: only plain LoRA adapters are supported, got "
            f"peft_type={config.get('peft_type')!r} use_dora={config.get('use_dora')}"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("modules_to_save"):
        raise ValueError(
            f"{directory}: rank_pattern, alpha_pattern and modules_to_save are not supported"
        )
    targets = config["target_modules"]
    if isinstance(targets, str) or not set(targets) <= set(ALL_TARGETS):
        raise ValueError(
            f"{directory}: target_modules must be a list out of {ALL_TARGETS}, got {targets!r}"
        )
    rank, alpha, rslora = int(config["r"]), float(config["lora_alpha"]), bool(config["use_rslora"])
    existing = lora_modules(model)
    if existing and (existing[0].rank, existing[0].alpha) != (rank, alpha):
        raise ValueError(
            f"the model's adapters (r={existing[0].rank}) differ from {directory} "
            f"(r={rank}); merge_lora() or use a fresh model"
        )
    if not existing:
        apply_lora(model, rank, alpha, tuple(targets), param_dtype=param_dtype, use_rslora=rslora)
    with safe_open(os.path.join(directory, "adapter_model.safetensors"), framework="flax") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open: no __iter__
    used = set()
    for i, owner, name in _projections(model):
        module = getattr(owner, name)
        if not isinstance(module, LoRALinear):
            continue
        group = "self_attn" if name in ATTENTION else "mlp"
        key = f"{PEFT_PREFIX}.{i}.{group}.{name}"
        a, b = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
        if a not in tensors or b not in tensors:
            raise KeyError(f"{directory}: adapter tensors for {key} are missing")
        for tensor in (a, b):  # a NaN adapter would score 0 without a word
            if not bool(jnp.isfinite(tensors[tensor]).all()):
                raise ValueError(f"{directory}: adapter tensor {tensor!r} holds NaN or inf values")
        module.lora_a.set_value(tensors[a].T.astype(module.lora_a[...].dtype))
        module.lora_b.set_value(tensors[b].T.astype(module.lora_b[...].dtype))
        used |= {a, b}
    if set(tensors) - used:
        raise ValueError(
            f"{directory}: unexpected adapter tensors {sorted(set(tensors) - used)[:4]}"
        )
    return model
