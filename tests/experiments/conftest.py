"""A tiny local 'Qwen' (random Qwen2 + a BPE tokenizer with Qwen's chat format) and AIME-style
problem files: what the main job and the evaluation script load when the hub is out of reach.
Both come from experiments/make_tiny.py, README's recipe for the same."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "experiments"))
from make_tiny import make_model, make_problems


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny-qwen")))


@pytest.fixture(scope="session")
def problem_files(tmp_path_factory):
    return make_problems(str(tmp_path_factory.mktemp("problems")))
