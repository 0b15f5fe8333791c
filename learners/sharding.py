"""Sharding over a `jax.sharding.Mesh` with a data axis and an fsdp (model) axis.

    mesh = make_mesh(data=2, fsdp=4)
    state = shard_state(state, mesh)          # parameters and optimizer state, fully sharded
    batch = shard_batch(batch, mesh)          # episodes split over "data" (and "fsdp")
    state, metrics = grpo_step(state, batch, cfg)   # jit propagates the shardings (GSPMD)

Partition rule (one rule for every array, so LoRA parameters, the frozen base and the optimizer
moments shard alike): a matrix is split along its first dimension that the fsdp axis divides, the
largest such dimension first; vectors, scalars and indivisible arrays are replicated. The batch
dimension of every batch array is split over both axes, so that each device holds one share of
episodes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from learners.train import TrainBatch, TrainState


def make_mesh(data: int = 1, fsdp: int | None = None, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    fsdp = fsdp or len(devices) // data
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, "
                         f"have {len(devices)}")
    return Mesh(np.array(devices).reshape(data, fsdp), ("data", "fsdp"))


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    if len(shape) < 2 or fsdp == 1:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def shard_tree(tree, mesh: Mesh):
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: jax.device_put(
        x, NamedSharding(mesh, param_spec(np.shape(x), fsdp))), tree)


def shard_state(state: TrainState, mesh: Mesh) -> TrainState:
    return TrainState(shard_tree(state.lora, mesh), shard_tree(state.rest, mesh),
                      shard_tree(state.opt_state, mesh),
                      jax.device_put(state.updates, NamedSharding(mesh, P())), state.graphdef)


def shard_batch(batch: TrainBatch, mesh: Mesh) -> TrainBatch:
    n = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not a multiple of the {n} devices")
        spec = P(("data", "fsdp"), *([None] * (x.ndim - 1)))
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, batch)
