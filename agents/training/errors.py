"""What `train` raises when a run cannot start or cannot go on: one small hierarchy, so that a
program that embeds the library catches `TrainingError` (or one kind of it) and goes on, while
the entry points (experiments/*.py, through toolgrpo.agents.training.cli) turn each into one line on
stderr and its exit code.

    TrainingError                 exit_code
    ├── InputError (ValueError)   2   a bad input, found before anything is written or loaded
    │   ├── ConfigError           2   a setting, or settings that do not go together
    │   └── HubUnreachable        2   the Hugging Face Hub cannot be reached for a model or data
    ├── Interrupted               128 + signal   a stop signal ended the run after a checkpoint
    ├── NonFiniteUpdates          3   updates diverged (toolgrpo.agents.training.loop)
    ├── RolloutsDown              5   the rollout servers failed and did not come back (loop)
    └── DiskFull (OSError)        4   the disk or quota filled up; resume once there is space

Each message is one line that says what to do; `__cause__` holds the exception underneath.
"""

from __future__ import annotations

import contextlib
import signal


class TrainingError(Exception):
    """A run that cannot start or cannot go on. `exit_code` is what an entry point exits with."""

    exit_code = 1


class InputError(TrainingError, ValueError):
    """A bad input: a model, tokenizer, problems file or run directory that cannot be used.
    Raised before anything is written (a ValueError, as the checks underneath raise)."""

    exit_code = 2


class ConfigError(InputError):
    """A setting, or a combination of settings, that cannot run."""


class HubUnreachable(InputError):
    """A model or problem set had to come from the Hugging Face Hub, which cannot be reached.
    `reason` says which; an entry point adds how to run with local files."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Interrupted(TrainingError):
    """A stop signal (`signum`) ended the run after `step` (its checkpoint, if any, saved)."""

    def __init__(self, step: int, signum: int = signal.SIGINT, detail: str = ""):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}" + (f": {detail}" if detail else ""))
        self.step, self.signum = step, signum
        self.exit_code = 128 + signum
        """The shell's code for a process ended by the signal: 130 (SIGINT), 143 (SIGTERM)."""


class DiskFull(TrainingError, OSError):
    """The disk (or the quota) filled up during the run; the checkpoints written before are
    intact, so the run resumes once there is space."""

    exit_code = 4


@contextlib.contextmanager
def disk_full_as_error():
    """A full disk or quota, wherever it is met (a checkpoint, the logs, an adapter), as
    DiskFull: the run resumes once there is space."""
    from toolgrpo.learners.checkpoint import CheckpointDiskFull, is_disk_full

    try:
        yield
    except CheckpointDiskFull as exc:
        raise DiskFull(str(exc)) from exc
    except OSError as exc:
        if not is_disk_full(exc) or isinstance(exc, DiskFull):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        raise DiskFull(
            f"no space left on the disk{where}: free space, then continue with --resume"
        ) from exc
