from toolgrpo.learners.devices import unused_accelerator


def test_a_cpu_only_jax_on_an_accelerator_machine_is_named_with_its_fix():
    gpu = unused_accelerator(backend="cpu", present=["gpu"])
    assert gpu is not None
    assert "an NVIDIA GPU" in gpu and "uv sync --extra cuda12" in gpu and "--allow-cpu" in gpu
    tpu = unused_accelerator(backend="cpu", present=["tpu"])
    assert tpu is not None and "uv sync --extra tpu" in tpu
    assert unused_accelerator(backend="gpu", present=["gpu"]) is None  # jax uses it
    assert unused_accelerator(backend="cpu", present=[]) is None  # nothing to use


def test_the_compilation_cache_keeps_a_program_for_the_next_process(tmp_path):
    """A second process with the same program loads it from the cache directory (jax reports
    a cache hit; the first process, a miss) and writes nothing new."""
    import subprocess
    import sys

    script = (
        "import jax, jax.numpy as jnp\n"
        "from toolgrpo.learners.devices import enable_compilation_cache\n"
        f"enable_compilation_cache({str(tmp_path)!r}, min_compile_time_s=0)\n"
        "events = []\n"
        "jax.monitoring.register_event_listener(lambda e, **kw: events.append(e))\n"
        "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()\n"
        "print('HIT' if '/jax/compilation_cache/cache_hits' in events else 'MISS')\n"
    )
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
        )
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append((out.stdout.split()[-1], sorted(p.name for p in tmp_path.iterdir())))
    (first, files), (second, files_after) = runs
    assert (first, second) == ("MISS", "HIT") and files and files_after == files, runs
