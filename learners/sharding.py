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


def tree_shardings(tree, mesh: Mesh):
    """The sharding of every array of `tree` (arrays, numpy or jax.ShapeDtypeStructs) by the
    partition rule."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """What `shard_state` gives each array of `state`: a TrainState of NamedShardings."""
    return TrainState(
        tree_shardings(state.lora, mesh),
        tree_shardings(state.rest, mesh),
        tree_shardings(state.opt_state, mesh),
        NamedSharding(mesh, P()),  # ty: ignore[invalid-argument-type] - shardings, not arrays
        state.graphdef,
    )


def batch_shardings(batch, mesh: Mesh, strict: bool = False):
    """What `place_batch` (`shard_batch` with `strict`) gives each array of `batch`: the batch
    dimension split over both axes where the devices divide it, else replicated (strict: a
    ValueError)."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    sizes = [np.shape(x)[0] for x in jax.tree.leaves(batch)]
    if any(size % n for size in sizes):
        if strict:
            size = next(size for size in sizes if size % n)
            raise ValueError(f"batch size {size} is not a multiple of the {n} devices")
        return jax.tree.map(lambda x: NamedSharding(mesh, P()), batch)
    return jax.tree.map(
        lambda x: NamedSharding(mesh, P(("data", "fsdp"), *([None] * (np.ndim(x) - 1)))), batch
    )


def abstract(tree, shardings):
    """`tree`'s arrays as jax.ShapeDtypeStructs with `shardings` (a tree like it): what
    `jax.jit(...).lower` takes to compile for a mesh's devices without placing anything on
    them (devices of a TPU slice this machine does not have: toolgrpo.learners.plan)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
    )


def shard_tree(tree, mesh: Mesh):
    return jax.tree.map(put, tree, tree_shardings(tree, mesh))


def shard_state(state: TrainState, mesh: Mesh) -> TrainState:
    return jax.tree.map(put, state, state_shardings(state, mesh))


def shard_batch(batch: TrainBatch, mesh: Mesh) -> TrainBatch:
    return jax.tree.map(put, batch, batch_shardings(batch, mesh, strict=True))


def place_batch(batch, mesh: Mesh):
    """`shard_batch` where the devices divide the batch; otherwise the batch replicated on
    every device (the same result, without the data parallelism): for the odd micro-batch, such
    as the one-row batch of a step without any sampled token."""
    return jax.tree.map(put, batch, batch_shardings(batch, mesh))
