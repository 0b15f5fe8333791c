"""Fixtures of the learner tests (helpers in tiny_qwen.py)."""

import jax
import pytest
from tiny import VARIANTS
from tiny_qwen import build_hf_model

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def hf_model_dir(request, tmp_path_factory):
    """(name, directory, torch model) of a tiny Qwen2 saved with save_pretrained."""
    model = build_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory, safe_serialization=True)
    return request.param, str(directory), model
