from learners.devices import unused_accelerator


def test_a_cpu_only_jax_on_an_accelerator_machine_is_named_with_its_fix():
    gpu = unused_accelerator(backend="cpu", present=["gpu"])
    assert "an NVIDIA GPU" in gpu and "uv sync --extra cuda12" in gpu and "--allow-cpu" in gpu
    assert "uv sync --extra tpu" in unused_accelerator(backend="cpu", present=["tpu"])
    assert unused_accelerator(backend="gpu", present=["gpu"]) is None  # jax uses it
    assert unused_accelerator(backend="cpu", present=[]) is None  # nothing to use

