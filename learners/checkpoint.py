"""Orbax checkpoints of a GRPO run: everything a resume needs, written atomically.

    ckpt = Checkpointer("runs/x/checkpoints", keep=3, every=10)
    ckpt.maybe_save(step, state, meta={"data_position": 123}, rng=key)   # every 10th step
    ckpt.save(step, state, meta=..., rng=key)                            # unconditionally
    state, meta, rng = ckpt.restore(state_template)      # latest; exact (bitwise on CPU)

Checkpoints are numbered by the loop's step. One holds the LoRA parameters, the optimizer state
and the update count (the TrainState's arrays, by position), the PRNG key, and a JSON record (`meta`, plus the tree structure and shapes, which
are checked on restore). Orbax writes each step to a temporary directory and renames it when
complete, so a crash mid-save leaves the previous checkpoints intact; a full disk during a save
removes that temporary directory and raises CheckpointDiskFull.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model being trained."""


class CheckpointDiskFull(CheckpointError):
    """The disk (or the quota) filled up while a checkpoint was written: that checkpoint is
    removed, the earlier ones are intact."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is a full disk or quota: an OSError,
    or the error text of tensorstore (which orbax raises as a ValueError)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in DISK_FULL:
            return True
        if any(os.strerror(code) in str(cause) for code in DISK_FULL):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _arrays(state) -> list:
    return jax.tree.leaves((state.lora, state.opt_state, state.updates))


def _signature(state) -> dict:
    leaves = _arrays(state)
    return {
        "structure": str(jax.tree.structure((state.lora, state.opt_state, state.updates))),
        "shapes": [[list(np.shape(x)), str(jnp.asarray(x).dtype)] for x in leaves],
    }


@contextlib.contextmanager
def _disk_full_unlogged():
    """Drops orbax's log records of a full disk (absl's logger: a traceback from each of its
    writing threads) inside; CheckpointDiskFull says it once."""

    def keep(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and is_disk_full(exc)) and "RESOURCE_EXHAUSTED" not in str(
            record.msg
        )

    logger = logging.getLogger("absl")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


class Checkpointer:
    """Saves and restores TrainStates under one directory, keeping the last `keep` steps."""

    def __init__(self, directory: str, keep: int = 3, every: int = 1):
        if keep < 1 or every < 1:
            raise ValueError(f"keep and every must be >= 1, got {keep} and {every}")
        self.every = every
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    @property
    def steps(self) -> list[int]:
        """The steps kept on disk, oldest first."""
        return sorted(self.manager.all_steps())

    def maybe_save(
        self,
        step: int,
        state,
        meta: dict | None = None,
        rng: jax.Array | None = None,
        force: bool = False,
    ) -> bool:
        """Save when `step` is a multiple of `every` (or when forced: at the end, on Ctrl-C)."""
        if force or step % self.every == 0:
            self.save(step, state, meta, rng)
            return True
        return False

    def save(self, step: int, state, meta: dict | None = None, rng: jax.Array | None = None) -> int:
        if step in self.manager.all_steps():  # a state is saved once per step
            return step
        # jax arrays as they are: sharded over the devices of several processes, each process
        # writes its own shards (orbax); the record is written once
        arrays = {
            f"{i:06d}": x if isinstance(x, jax.Array) else np.asarray(x)
            for i, x in enumerate(_arrays(state))
        }
        if rng is not None:
            arrays["rng"] = np.asarray(jax.random.key_data(rng))
        record = {"meta": meta or {}, "signature": _signature(state), "has_rng": rng is not None}
        earlier = set(self._unfinished(step))
        try:
            with _disk_full_unlogged():
                self._write(step, arrays, record)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            for name in set(self._unfinished(step)) - earlier:  # what this save wrote, only
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            last = max(self.steps, default=None)
            raise CheckpointDiskFull(
                f"no space left on the disk of {self.directory} while checkpoint {step} was "
                "written (removed): free space, then continue with --resume from "
                + (f"checkpoint {last}" if last is not None else "the start (no checkpoint yet)")
            ) from None
        return step

    def _write(self, step: int, arrays: dict, record: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), record=ocp.args.JsonSave(record)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def _unfinished(self, step: int) -> list[str]:
        """The temporary directories of checkpoints of `step` being written (orbax renames one
        to STEP when it is complete)."""
        prefix = f"{step}.orbax-checkpoint-tmp"
        return [n for n in os.listdir(self.directory) if n.startswith(prefix)]

    def restore(self, template, step: int | None = None):
        """(state, meta, rng) from `step` (default: the latest). `template` is a TrainState of
        the model being trained; the checkpoint must have the same structure and shapes."""
        step = self.latest_step if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            record = self.manager.restore(
                step, args=ocp.args.Composite(record=ocp.args.JsonRestore())
            )["record"]
        except Exception as exc:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} is unreadable: "
                f"{type(exc).__name__}: {str(exc)[:200]}"
            ) from exc
        expected = _signature(template)
        if record.get("signature") != expected:
            got = record.get("signature", {}).get("shapes", [])
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} does not fit this model: it holds "
                f"{len(got)} arrays, the model's train state {len(expected['shapes'])} "
                "(different LoRA rank, targets, model size or optimizer?). Start a new run "
                "directory, or restore with the settings it was written with."
            )
        leaves = _arrays(template)
        # each array comes back with the template's sharding (across processes: each reads its
        # own shards)
        target = {
            f"{i:06d}": jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array)
            else np.zeros(np.shape(x), np.asarray(x).dtype)
            for i, x in enumerate(leaves)
        }
        if record.get("has_rng"):
            target["rng"] = np.zeros((2,), np.uint32)
        try:
            arrays = self.manager.restore(
                step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(target))
            )["arrays"]
        except Exception as exc:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} is unreadable: "
                f"{type(exc).__name__}: {str(exc)[:200]}"
            ) from exc
        treedef = jax.tree.structure((template.lora, template.opt_state, template.updates))
        lora, opt_state, updates = jax.tree.unflatten(
            treedef,
            [
                arrays[f"{i:06d}"]
                if isinstance(arrays[f"{i:06d}"], jax.Array)
                else jnp.asarray(arrays[f"{i:06d}"])
                for i in range(len(leaves))
            ],
        )
        state = dataclasses.replace(template, lora=lora, opt_state=opt_state, updates=updates)
        rng = jax.random.wrap_key_data(jnp.asarray(arrays["rng"])) if "rng" in arrays else None
        return state, record["meta"], rng
