"""Fixtures of the learner tests (helpers in tiny_qwen.py)."""

import jax
import pytest
from tiny import VARIANTS
from tiny_qwen import build_hf_model

jax.config.update("jax_default_matmul_precision", "highest")


FAST_VARIANT = "gqa_tied"
"""The variant shaped like Qwen2.5-0.5B (grouped-query attention, tied embeddings): the one the
fast tier (`-m "not slow"`) compares with transformers; the others run in the full suite."""


@pytest.fixture(
    scope="session",
    params=[
        name if name == FAST_VARIANT else pytest.param(name, marks=pytest.mark.slow)
        for name in sorted(VARIANTS)
    ],
)
def hf_model_dir(request, tmp_path_factory):
    """(name, directory, torch model) of a tiny Qwen2 saved with save_pretrained."""
    model = build_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory, safe_serialization=True)
    return request.param, str(directory), model
