"""The supervised warm-start step: it learns, and its learning rate can be scaled mid-run."""

import jax
import numpy as np
import pytest
from flax import nnx
from tiny import VARIANTS, tiny_base_model

from toolgrpo.learners.sft import SFTStep, sft_loss


def _model():
    return tiny_base_model("gqa_tied")


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VARIANTS["gqa_tied"]["vocab_size"], (4, 16)).astype(np.int32)
    loss_mask = np.zeros((4, 16), np.int32)
    loss_mask[:, 8:] = 1  # learn only the second half of each row
    return {"tokens": tokens, "loss_mask": loss_mask}


def _params(model):
    return [np.array(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.mark.slow
def test_sft_fits_a_fixed_batch_on_the_masked_tokens():
    model, batch = _model(), _batch()
    step = SFTStep(model, learning_rate=1e-2, warmup_steps=1)
    first = step(batch)
    for _ in range(30):
        last = step(batch)
    assert last < 0.5 * first
    # the masked-out half is not what it fits
    unmasked = {"tokens": batch["tokens"], "loss_mask": 1 - batch["loss_mask"]}
    assert float(sft_loss(model, unmasked["tokens"], unmasked["loss_mask"])) > 2 * last


def test_scaled_learning_rate_scales_the_next_update():
    batch = _batch()
    full, half = _model(), _model()
    steps = [SFTStep(m, learning_rate=1e-3, warmup_steps=1) for m in (full, half)]
    for s in steps:  # the same history: identical Adam moments
        s(batch)
    start = _params(full)
    steps[1].scale_learning_rate(0.5)
    for s in steps:
        s(batch)
    # updates are ~1e-3; a parameter difference is exact to the parameters' float32 spacing
    for p0, a, b in zip(start, _params(full), _params(half)):
        ulp = np.spacing(np.maximum(np.abs(p0), np.abs(a)).astype(np.float32))
        np.testing.assert_array_less(np.abs((b - p0) - 0.5 * (a - p0)), 2 * ulp + 1e-12)
    steps[1].scale_learning_rate(0.0)
    frozen = _params(half)
    steps[1](batch)
    assert all((a == b).all() for a, b in zip(frozen, _params(half)))
