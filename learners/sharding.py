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

Across processes (`jax.distributed`, one process a host): the mesh holds every process's devices
(jax.devices()), each process holds the whole value of an array (the same in every process: the
model it loaded, the batch process 0 broadcast) and `put` places only its own shards of it;
`gather` brings a sharded array back whole to every process (for an export).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from toolgrpo.learners.batch import TrainBatch
from toolgrpo.learners.train import TrainState


def make_mesh(data: int = 1, fsdp: int | None = None, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if fsdp is None and len(devices) % data:
        raise ValueError(
            f"mesh data={data} must divide the {len(devices)} devices (the fsdp axis takes the "
            "rest)"
        )
    fsdp = fsdp or len(devices) // data
    if data * fsdp != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, have {len(devices)}"
        )
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


def put(x, sharding: NamedSharding) -> jax.Array:
    """`x` (its whole value, the same in every process) as an array with `sharding`, whose
    devices may belong to several processes: each process places its own shards."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def gather(tree):
    """Every array of `tree` whole, as numpy, in every process (all processes must call it)."""
    from jax.experimental import multihost_utils

    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(whole, tree)


def shard_tree(tree, mesh: Mesh):
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: put(x, NamedSharding(mesh, param_spec(np.shape(x), fsdp))), tree)


def shard_state(state: TrainState, mesh: Mesh) -> TrainState:
    return TrainState(
        shard_tree(state.lora, mesh),
        shard_tree(state.rest, mesh),
        shard_tree(state.opt_state, mesh),
        put(state.updates, NamedSharding(mesh, P())),
        state.graphdef,
    )


def shard_batch(batch: TrainBatch, mesh: Mesh) -> TrainBatch:
    n = mesh.shape["data"] * mesh.shape["fsdp"]

    def place(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not a multiple of the {n} devices")
        spec = P(("data", "fsdp"), *([None] * (x.ndim - 1)))
        return put(x, NamedSharding(mesh, spec))

    return jax.tree.map(place, batch)


def place_batch(batch, mesh: Mesh):
    """`shard_batch` where the devices divide the batch; otherwise the batch replicated on
    every device (the same result, without the data parallelism): for the odd micro-batch, such
    as the one-row batch of a step without any sampled token."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if all(np.shape(x)[0] % n == 0 for x in jax.tree.leaves(batch)):
        return shard_batch(batch, mesh)
    return jax.tree.map(lambda x: put(x, NamedSharding(mesh, P())), batch)
