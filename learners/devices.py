"""Which accelerator jax runs on, and whether the machine has one that jax cannot use.

`pip`/`uv` give a CPU-only jaxlib unless the CUDA or TPU build is asked for (the project's
extras: `uv sync --extra cuda12`, `--extra cuda13`, `--extra tpu`); on a GPU machine such an
install runs everything on the CPU without a word. `unused_accelerator()` says so.
"""

from __future__ import annotations

import glob

INSTALL_HINTS = {
    "gpu": ("an NVIDIA GPU", "uv sync --extra cuda12 (or --extra cuda13 for a CUDA 13 driver)"),
    "tpu": ("a TPU", "uv sync --extra tpu"),
}


def local_accelerators() -> list[str]:
    """The kinds of accelerator whose device files this machine has ("gpu", "tpu")."""
    found = []
    if glob.glob("/dev/nvidia[0-9]*"):
        found.append("gpu")
    if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        found.append("tpu")
    return found


def unused_accelerator(backend: str | None = None, present: list[str] | None = None) -> str | None:
    """One line when jax runs on the CPU of a machine with an accelerator (else None)."""
    if backend is None:
        import jax

        backend = jax.default_backend()
    present = local_accelerators() if present is None else present
    if backend != "cpu" or not present:
        return None
    what, hint = INSTALL_HINTS[present[0]]
    return (
        f"this machine has {what} but jax runs on the CPU (a CPU-only jaxlib is installed): "
        f"{hint} installs the accelerator build; --allow-cpu runs on the CPU anyway"
    )


def enable_compilation_cache(directory: str | None = None, min_compile_time_s: float = 1.0) -> str:
    """Keep compiled programs on disk (jax's persistent compilation cache), so that a rerun or a
    resumed run with the same shapes loads them instead of compiling again. The directory is
    `directory`, else $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/toolgrpo/jax
    (~/.cache/toolgrpo/jax); programs that compile faster than `min_compile_time_s` are not
    kept. Returns the directory."""
    import os

    import jax

    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = (
        directory
        or os.environ.get("JAX_COMPILATION_CACHE_DIR")
        or os.path.join(cache_home, "toolgrpo", "jax")
    )
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    return path
