"""A memory plan of one GRPO step: the step's programs compiled with abstract shapes, nothing
allocated or run, and XLA's figures for each. For the backend here, or for a TPU slice this
machine does not have: with libtpu installed (the `tpu-compile` dependency group, x86-64 Linux: `uv sync --group
tpu-compile`),
XLA's TPU compiler runs on the CPU, and the programs lowered over the slice's devices
(jax.experimental.topologies) compile for the real chips.

    state = abstract_state(Qwen2Config(), grpo_cfg, rank=128)      # jax.ShapeDtypeStructs
    plan = plan_step(state, grpo_cfg, rows=8, length=1024, target="tpu:v5e:2x2")
    plan["programs"]["update"]["temp_bytes"]       # per chip, against plan["hbm_bytes"]

The mesh is the main job's (toolgrpo.agents.training.distributed.initialize: make_mesh(data, ...) over
every device), the state is sharded as shard_state shards it and each micro-batch as
place_batch places it (toolgrpo.learners.sharding), and the programs are toolgrpo.learners.train.lower_passes':
the real update, not a copy of it. XLA's figures are per device: a program's temporaries,
arguments and outputs on each chip.
"""

from __future__ import annotations

import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np

from toolgrpo.learners.train import GRPOConfig, TrainState, init_state, lower_passes

HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
"""High-bandwidth memory of one chip of each TPU generation, GiB (Google Cloud's figures)."""


def tpu_devices(topology: str) -> list:
    """The devices of the TPU slice `topology` ("v5e:2x2", "v6e:2x4", "v5p:2x2x1", "v4:2x2x1"),
    to compile for (compile-only: nothing runs on them). Needs libtpu (x86-64 Linux: `uv sync --group
    tpu-compile`)."""
    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:  # jax finds the compiler through it
        raise RuntimeError(
            f"compiling for {topology} needs libtpu (XLA's TPU compiler), which is not "
            "installed: `uv sync --group tpu-compile` installs it on x86-64 Linux"
        )
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


def hbm_gib(topology: str) -> float | None:
    """One chip's HBM for a topology name ("v5e:2x2": 16), None for a generation not in
    HBM_GIB."""
    return HBM_GIB.get(topology.split(":")[0].lower())


def abstract_state(
    model_cfg,
    grpo_cfg: GRPOConfig,
    *,
    rank: int,
    alpha: float | None = None,
    dtype=jnp.bfloat16,
    remat: bool = True,
    attention: str = "auto",
    attention_block: int = 512,
    seed: int = 0,
) -> TrainState:
    """The TrainState of a Qwen2 model of `model_cfg` (a toolgrpo.learners.qwen2.Qwen2Config) with LoRA of
    `rank` on every projection, as jax.ShapeDtypeStructs (nothing allocated): the base in
    `dtype`, LoRA and AdamW's moments in float32, as the main job holds them."""
    from flax import nnx

    from toolgrpo.learners.lora import apply_lora
    from toolgrpo.learners.qwen2 import Qwen2ForCausalLM

    def build():
        model = Qwen2ForCausalLM(
            model_cfg,
            dtype=dtype,
            param_dtype=dtype,
            remat=remat,
            attention=attention,
            attention_block=attention_block,
            rngs=nnx.Rngs(seed),
        )
        apply_lora(
            model, rank=rank, alpha=alpha if alpha is not None else rank, param_dtype=jnp.float32
        )
        return init_state(model, grpo_cfg)

    return jax.eval_shape(build)


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _platform(compiled) -> str:
    """The platform of the devices a compiled program is for ("tpu", "cpu")."""
    shardings = jax.tree.leaves(compiled.input_shardings)
    platforms = {d.platform for s in shardings for d in s.device_set}
    return ",".join(sorted(platforms))


def plan_step(
    state: TrainState,
    grpo_cfg: GRPOConfig,
    rows: int,
    length: int,
    *,
    target: str | None = None,
    data: int = 1,
    sampler_logprobs: bool = False,
) -> dict:
    """Compile every program one step of `grpo_cfg` runs on a micro-batch of [rows, length]
    (toolgrpo.learners.train.lower_passes) and return XLA's figures. `target`: None for this machine's
    backend (one device, as bench_learner.py --plan has always measured), or "tpu:TOPOLOGY"
    ("tpu:v5e:2x2") for that slice's devices, over the main job's mesh (`data` x the rest) with
    the state and the micro-batch sharded. Returns

        backend, device (kind), devices, mesh {"data", "fsdp"}, hbm_bytes (one chip's, or None),
        lower_s, compile_s (lowering and every compile), state_bytes (the whole state, unsharded),
        programs: {name: {platform, temp_bytes, argument_bytes, output_bytes, compile_s,
                          unsharded_argument_bytes}}

    where temp/argument/output bytes are per device."""
    from toolgrpo.learners.sharding import abstract, batch_shardings, make_mesh, state_shardings

    place = None
    if target is None:
        devices = jax.devices()[:1]
        hbm = None
    else:
        platform, _, topology = target.partition(":")
        if platform != "tpu" or not topology:
            raise ValueError(f"target must be tpu:TOPOLOGY (tpu:v5e:2x2), got {target!r}")
        devices = tpu_devices(topology)
        mesh = make_mesh(data=data, devices=devices)
        state = abstract(state, state_shardings(state, mesh))
        place = lambda mb: abstract(mb, batch_shardings(mb, mesh))
        gib = hbm_gib(topology)
        hbm = None if gib is None else int(gib * 2**30)
    t0 = time.perf_counter()
    programs = lower_passes(state, grpo_cfg, rows, length, sampler_logprobs, place=place)
    lower_s = time.perf_counter() - t0
    out: dict = {
        "backend": devices[0].platform,
        "device": devices[0].device_kind,
        "devices": len(devices),
        "mesh": {"data": data, "fsdp": len(devices) // data},
        "hbm_bytes": hbm,
        "lower_s": lower_s,
        "state_bytes": _nbytes(state),
        "programs": {},
    }
    for name, lowered in programs.items():
        t0 = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        memory = compiled.memory_analysis()
        out["programs"][name] = {
            "platform": _platform(compiled),
            "temp_bytes": int(memory.temp_size_in_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes),
            "output_bytes": int(memory.output_size_in_bytes),
            "compile_s": compile_s,
            "unsharded_argument_bytes": _nbytes(lowered.args_info),
        }
    out["compile_s"] = lower_s + sum(p["compile_s"] for p in out["programs"].values())
    return out
