"""Several processes training one model (one process a host): `jax.distributed`, a mesh over
every process's devices, and which process writes.

    cfg = DistConfig(multihost=True)             # TPU pod slice, SLURM, Open MPI: from the env
    cfg = DistConfig(coordinator="10.0.0.1:1234", num_processes=2, process_id=0)   # explicit
    mesh = initialize(cfg)                       # jax.distributed, then make_mesh(data, fsdp)
    state = shard_state(state, mesh)             # toolgrpo.learners.sharding: parameters, optimizer state
    if is_main(): log.log(...)                   # logs, transcripts and exports: process 0 only

Every process runs the same program (SPMD): the same steps, the same jitted update on arrays
sharded over the global mesh; orbax writes each process's shards of a checkpoint and reads them
back (toolgrpo.learners.checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jax.sharding import Mesh


@dataclass(frozen=True)
class DistConfig:
    """Processes and devices of the learner."""

    multihost: bool = False
    """Start jax.distributed (set by itself when `coordinator` is given). Without a
    coordinator, jax reads the cluster from the environment: TPU pod slices, SLURM, Open MPI,
    Kubernetes (JobSet)."""
    coordinator: str | None = None
    """host:port of process 0's coordination service."""
    num_processes: int | None = None
    """Processes in the job (with `coordinator`)."""
    process_id: int | None = None
    """This process's rank, 0..num_processes-1 (with `coordinator`)."""
    cpu_collectives: str = "gloo"
    """jax_cpu_collectives_implementation for processes on CPUs (their collectives go over TCP)."""
    data: int = 1
    """Size of the mesh's data axis; its fsdp axis takes the rest of the devices."""

    def __post_init__(self):
        explicit = (self.coordinator, self.num_processes, self.process_id)
        if any(v is not None for v in explicit) and any(v is None for v in explicit):
            raise ValueError(
                "dist.coordinator, dist.num_processes and dist.process_id go "
                f"together; got {explicit}"
            )
        n, i = self.num_processes, self.process_id  # both set, or neither
        if n is not None and i is not None and not 0 <= i < n:
            raise ValueError(f"dist.process_id must be in 0..{n - 1}, got {i}")
        if self.data < 1:
            raise ValueError(f"dist.data must be >= 1, got {self.data}")

    @property
    def enabled(self) -> bool:
        return self.multihost or self.coordinator is not None


def initialize(cfg: DistConfig) -> Mesh:
    """jax.distributed as `cfg` says (nothing for a single process), then the mesh over every
    process's devices: data x fsdp."""
    import jax

    from toolgrpo.learners.sharding import make_mesh

    if cfg.enabled and not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
        )
    return make_mesh(data=cfg.data, devices=jax.devices())


def is_main() -> bool:
    """Whether this is process 0, the one that writes logs, transcripts and exports."""
    import jax

    return jax.process_index() == 0
