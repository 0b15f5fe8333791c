"""What a PythonSandbox is configured with (SandboxConfig, and the modules its server preloads by
default), and the error it raises when the sandbox itself fails (SandboxError)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_PRELOAD = (
    "math",
    "cmath",
    "fractions",
    "decimal",
    "itertools",
    "functools",
    "collections",
    "heapq",
    "bisect",
    "statistics",
    "random",
    "re",
    "string",
    "json",
    "numpy",
    "sympy",
)


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and start-up settings of a PythonSandbox."""

    timeout_s: float = 10.0
    """Default wall-clock limit of one call, in seconds (a call may ask for another)."""
    max_timeout_s: float = 120.0
    """Largest wall-clock limit a call may ask for; also bounds each process's CPU time."""
    memory_mb: int = 1024
    """Address-space limit of every sandboxed process, in MiB (the warm server takes ~220)."""
    max_processes: int = 64
    """Processes plus threads a session may have at once (RLIMIT_NPROC on the session's uid)."""
    max_file_mb: int = 64
    """Largest file the code may write, in MiB."""
    scratch_mb: int = 512
    """Size of the private tmpfs that holds every session's scratch directory, in MiB."""
    max_output_bytes: int = 64 * 1024
    """Kept bytes of stdout and of stderr each (half head, half tail) before truncation."""
    max_open_files: int = 256
    """Open file descriptors per process."""
    pool_size: int = 2
    """Sessions kept ready in advance, so that opening one costs no fork on the caller's path."""
    isolation: Literal["auto", "namespaces", "none"] = "auto"
    """"auto": Linux namespaces when the machine allows, else what remains (with a warning);
    "namespaces": fail unless they are available; "none": rlimits and uid separation only."""
    preload: tuple[str, ...] = DEFAULT_PRELOAD
    """Modules imported once by the server, before any fork."""
    start_timeout_s: float = 120.0
    """How long to wait for the server to import its modules and report ready."""
    readable_paths: tuple[str, ...] = ()
    """Host directories the code may read besides what the interpreter needs (a dataset, say),
    shown read-only at their own paths in the sandbox's minimal root (absolute paths)."""

    def __post_init__(self):
        for name in (
            "timeout_s",
            "max_timeout_s",
            "memory_mb",
            "max_processes",
            "max_file_mb",
            "scratch_mb",
            "max_open_files",
            "start_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"SandboxConfig.{name} must be positive, got {getattr(self, name)!r}"
                )
        if self.timeout_s > self.max_timeout_s:
            raise ValueError(
                f"SandboxConfig.timeout_s={self.timeout_s} exceeds "
                f"max_timeout_s={self.max_timeout_s}"
            )
        if self.memory_mb < 256:
            raise ValueError(
                f"SandboxConfig.memory_mb={self.memory_mb} is below the ~220 MiB the "
                "warm interpreter itself maps; use at least 256"
            )
        if self.pool_size < 0 or self.max_output_bytes < 0:
            raise ValueError("SandboxConfig.pool_size and max_output_bytes must be >= 0")
        for path in self.readable_paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(
                    f"SandboxConfig.readable_paths holds {path!r}: give absolute paths"
                )
        if self.isolation not in ("auto", "namespaces", "none"):
            raise ValueError(
                f"SandboxConfig.isolation must be auto, namespaces or none, got {self.isolation!r}"
            )


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, or its server died); never the code's fault."""
