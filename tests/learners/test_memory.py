"""What keeps the learner's memory proportional to the work: blockwise attention, log-probabilities
from hidden states a chunk at a time, one scanned layer, micro-batches cut by length. Each is
checked against the plain formulation it replaces (values and gradients), and the cut against
the whole batch's loss and gradient."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_config, tiny_model

from toolgrpo.learners import grpo
from toolgrpo.learners.attention import causal_attention
from toolgrpo.learners.batch import LENGTHS, TrainBatch, needed_lengths, plan_micro_batches
from toolgrpo.learners.qwen2 import Qwen2ForCausalLM
from toolgrpo.learners.train import GRPOConfig, grpo_step, init_state

F32_EPS = float(jnp.finfo(jnp.float32).eps)


def qkv(b=2, t=37, n=6, k=2, h=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(keys[0], (b, t, n, h)),
        jax.random.normal(keys[1], (b, t, k, h)),
        jax.random.normal(keys[2], (b, t, k, h)),
    )


@pytest.mark.parametrize(
    "chunk",
    [pytest.param(1, marks=pytest.mark.slow), pytest.param(8, marks=pytest.mark.slow), 10, 64],
)
def test_blockwise_attention_equals_jax_dot_product_attention(chunk):
    """Values and gradients of the blockwise attention equal jax.nn.dot_product_attention's (XLA's
    formulation on the CPU), with right padding, for chunks that do and do not divide T."""
    q, k, v = qkv()
    lengths = jnp.array([37, 23])
    key_mask = jnp.arange(37)[None, :] < lengths[:, None]
    ours = lambda q, k, v: causal_attention(q, k, v, key_mask, "blockwise", chunk)
    ref = lambda q, k, v: causal_attention(q, k, v, key_mask, "dot_product")
    # softmax rows of <= 37 terms of O(1) values: float32 rounding of a few ulps per term
    tol = 64 * F32_EPS
    valid = np.asarray(key_mask)
    np.testing.assert_allclose(
        np.asarray(ours(q, k, v))[valid], np.asarray(ref(q, k, v))[valid], atol=tol, rtol=tol
    )
    weights = jax.random.normal(jax.random.key(9), (2, 37, 48)) * key_mask[..., None]
    grads = [
        jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(q, k, v)
        for f in (ours, ref)
    ]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=4 * tol, rtol=4 * tol)


def test_blockwise_attention_holds_no_full_score_matrix():
    """At T = 4 x chunk the compiled forward's temporaries stay below one [B, N, T, T] float32
    score matrix (the plain formulation needs at least that)."""
    b, t, n, k, h = 1, 1024, 4, 2, 8
    q, kk, v = (jax.ShapeDtypeStruct((b, t, x, h), jnp.float32) for x in (n, k, k))
    mask = jax.ShapeDtypeStruct((b, t), bool)
    full = b * n * t * t * 4

    def temp(impl):
        f = jax.jit(lambda q, k, v, m: causal_attention(q, k, v, m, impl, 256))
        analysis = f.lower(q, kk, v, mask).compile().memory_analysis()
        assert analysis is not None  # None only from a backend that cannot tell
        return analysis.temp_size_in_bytes

    assert temp("dot_product") >= full
    assert temp("blockwise") < full / 2


@pytest.mark.parametrize("chunk", [pytest.param(1, marks=pytest.mark.slow), 7, 1000])
def test_logprobs_from_hidden_equal_the_full_logits(chunk):
    b, t, d, vocab = 3, 11, 16, 50
    keys = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(keys[0], (b, t, d))
    w = jax.random.normal(keys[1], (vocab, d))
    tokens = jax.random.randint(keys[2], (b, t), 0, vocab)
    weights = jax.random.normal(jax.random.key(4), (b, t))

    def ours(hidden):
        lp, ent = grpo.token_logprobs_from_hidden(hidden, w, tokens, chunk, entropy=True)
        return jnp.sum(lp * weights), (lp, ent)

    def full(hidden):
        logits = hidden @ w.T
        lp = grpo.token_logprobs(logits, tokens)
        return jnp.sum(lp * weights), (lp, grpo.token_entropy(logits))

    (_, (lp_a, ent_a)), g_a = jax.value_and_grad(ours, has_aux=True)(hidden)
    (_, (lp_b, ent_b)), g_b = jax.value_and_grad(full, has_aux=True)(hidden)
    # log-softmax over 50 logits of size O(10): a few ulps of the largest
    tol = 256 * F32_EPS
    np.testing.assert_allclose(np.asarray(lp_a), np.asarray(lp_b), atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(ent_a), np.asarray(ent_b), atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(g_a), np.asarray(g_b), atol=tol, rtol=tol)
    assert float(lp_a[0, 0]) == 0.0 and float(ent_a[0, 0]) == 0.0
    # the entropy is a metric: no gradient flows through it
    g_ent = jax.grad(
        lambda h: jnp.sum(grpo.token_logprobs_from_hidden(h, w, tokens, chunk, entropy=True)[1])
    )(hidden)
    assert not np.asarray(g_ent).any()


@pytest.mark.slow
def test_scanned_layers_equal_unrolled_ones():
    """One scanned layer or the layers one after another: the same logits and LoRA gradients."""
    ids = jax.random.randint(jax.random.key(0), (2, 9), 0, 97)
    results = []
    for scan in (True, False):
        model = tiny_model("gqa_tied", lora_seed=2)
        for layer in model.layers:  # B != 0, so that every LoRA matrix has a gradient
            layer.mlp.up_proj.lora_b.set_value(jnp.full(layer.mlp.up_proj.lora_b.shape, 0.1))
        model.scan_layers, model.remat = scan, True
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
        loss = lambda lora, graphdef=graphdef, rest=rest: jnp.mean(
            nnx.merge(graphdef, lora, rest)(ids) ** 2
        )
        results.append(
            (
                np.asarray(nnx.merge(graphdef, lora, rest)(ids)),
                jax.tree.leaves(jax.grad(loss)(lora)),
            )
        )
    (logits_a, grads_a), (logits_b, grads_b) = results
    np.testing.assert_allclose(logits_a, logits_b, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)


def test_the_model_compiles_one_layer_when_scanned():
    """Six more layers add to a scanned model's program only the stacking of their parameters;
    unrolled, they add six copies of a layer."""

    def hlo_size(layers, scan):
        model = Qwen2ForCausalLM(tiny_config(num_hidden_layers=layers), scan_layers=scan)
        graphdef, state = nnx.split(model)
        f = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
        return len(f.lower(state, jnp.zeros((1, 8), jnp.int32)).as_text())

    scanned = hlo_size(8, True) - hlo_size(2, True)
    unrolled = hlo_size(8, False) - hlo_size(2, False)
    assert scanned < 0.25 * unrolled, (scanned, unrolled)


def test_micro_batch_plan():
    lengths = np.array([5, 0, 100, 40, 33, 7])
    plan = plan_micro_batches(lengths, GRPOConfig(micro_batch_size=2))
    assert [list(i) for i, _, _ in plan] == [[2, 3], [4, 5], [0]]  # longest first, none empty
    assert [(rows, length) for _, rows, length in plan] == [(2, 128), (2, 48), (2, 32)]
    assert all(length in LENGTHS for _, _, length in plan)
    budget = plan_micro_batches(lengths, GRPOConfig(micro_batch_tokens=200))
    assert [(list(i), rows, length) for i, rows, length in budget] == [
        ([2], 1, 128),
        ([3, 4, 5, 0], 4, 48),
    ]
    for n in range(1, 5000, 7):  # padding below a third of the padded length
        assert n <= min(x for x in LENGTHS if x >= n) <= max(32, 1.5 * n)
    mask = np.zeros((3, 8))
    mask[0, 2:5], mask[2, 7] = 1, 1
    assert list(needed_lengths(mask)) == [5, 0, 8]


CUT_BATCH_LENGTHS = [(3, 40), (3, 9), (5, 30), (2, 3), (4, 4), (6, 21)]


def cut_batch():
    """Six episodes of different lengths, their sampled tokens at [start, end); one has none."""
    rng = np.random.default_rng(0)
    b, t = 6, 40
    loss_mask = np.zeros((b, t), np.float32)
    for row, (start, end) in enumerate(CUT_BATCH_LENGTHS):
        loss_mask[row, start:end] = 1
    return TrainBatch(
        rng.integers(0, 32, (b, t)).astype(np.int32),
        loss_mask,
        rewards=np.array([1.0, 0.0, 0.5, 0.2, 0.0, 1.0]),
        group_ids=np.array([0, 0, 0, 1, 1, 1]),
        sampler_logprobs=-rng.uniform(0, 3, (b, t)).astype(np.float32) * loss_mask,
    )


@pytest.mark.parametrize(
    "aggregation,options",
    [
        pytest.param(  # every pass
            "seq-mean-token-mean",
            {"ppo_epochs": 2, "beta": 0.1, "tis_cap": 2.0},
            marks=pytest.mark.slow,
        ),
        ("token-mean", {}),
        pytest.param("seq-mean-token-sum-norm", {}, marks=pytest.mark.slow),
    ],
)
def test_any_cut_gives_the_whole_batch_loss_and_gradient(aggregation, options):
    """Episodes of different lengths: micro-batches of a few rows, of one, or of a token budget
    give the whole batch's metrics and parameters (with the default aggregation also over two
    PPO epochs, the KL term and importance weights)."""
    cuts = [
        {"micro_batch_size": None},
        {  # each cut compiles its shapes: one other cut each
            "seq-mean-token-mean": {"micro_batch_tokens": 100},  # 2 x 48, then 3 x 32
            "token-mean": {"micro_batch_size": 1},  # 1 x 48 twice, then 1 x 32 three times
            "seq-mean-token-sum-norm": {"micro_batch_size": 4},
        }[aggregation],
    ]  # 4 x 48, 4 x 32
    results = []
    for cut in cuts:
        cfg = GRPOConfig(
            learning_rate=1e-2,
            warmup_steps=1,
            schedule="constant",
            aggregation=aggregation,
            max_tokens=40,
            **options,
            **cut,
        )
        model = tiny_model(lora_seed=3)
        for layer in model.layers:
            layer.self_attn.q_proj.lora_b.set_value(
                jnp.full(layer.self_attn.q_proj.lora_b.shape, 0.05)
            )
        state, metrics = grpo_step(init_state(model, cfg), cut_batch(), cfg)
        results.append((cut, metrics, jax.tree.leaves(state.lora)))
    (_, m0, p0), *others = results
    keys = ["loss", "grad_norm", "entropy", "ratio_mean", "first_pass_ratio_mean"]
    if options:
        keys += ["kl", "sampler_learner_gap", "tis_weight_mean"]
    for cut, m, p in others:
        for key in keys:
            assert m[key] == pytest.approx(m0[key], rel=1e-4, abs=1e-6), (cut, key)
        for a, b_ in zip(p0, p):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5, rtol=1e-4)
    assert results[0][1]["micro_batches"] == 1
    assert (
        results[1][1]["micro_batches"]
        == {"seq-mean-token-mean": 2, "token-mean": 5, "seq-mean-token-sum-norm": 2}[aggregation]
    )


def test_a_batch_without_sampled_tokens_still_takes_a_step():
    cfg = GRPOConfig(learning_rate=1e-2, warmup_steps=1, schedule="constant")
    state = init_state(tiny_model(), cfg)
    batch = TrainBatch(
        np.ones((2, 5), np.int32),
        np.zeros((2, 5), np.float32),
        rewards=np.array([1.0, 0.0]),
        group_ids=np.array([0, 0]),
    )
    new, metrics = grpo_step(state, batch, cfg)
    assert int(new.updates) == 1 and metrics["grad_norm"] == 0.0 and metrics["loss"] == 0.0
    assert int(new.opt_state[1][0].count) == 1
    for a, b in zip(jax.tree.leaves(state.lora), jax.tree.leaves(new.lora)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_memory_plan_of_a_small_model():
    """`lower_passes` compiles every program of a step for abstract shapes: the update's
    temporaries grow with the micro-batch (but far slower than its [R, L, V] logits would),
    the optional passes appear when the config asks for them."""
    from toolgrpo.learners.train import lower_passes

    def build(cfg):
        model = tiny_model(vocab_size=4096)
        model.attention_block = 64
        return init_state(model, cfg)

    def plan(rows, length, **kw):
        cfg = GRPOConfig(total_steps=10, logprob_chunk=64, **kw)
        state = jax.eval_shape(lambda: build(cfg))
        programs = lower_passes(state, cfg, rows, length)
        return {
            name: p.compile().memory_analysis().temp_size_in_bytes for name, p in programs.items()
        }

    small, big = plan(2, 64), plan(2, 512)
    assert set(small) == {"update", "apply"}
    logits = 2 * 512 * 4096 * 4  # one float32 copy of the [2, 512, V] logits
    assert small["update"] < big["update"] < logits / 2
    assert set(plan(2, 64, ppo_epochs=2, beta=0.1)) == {
        "update",
        "apply",
        "old_logprobs",
        "ref_logprobs",
    }


def test_config_rejects_bad_cuts():
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        GRPOConfig(micro_batch_tokens=0)
    with pytest.raises(ValueError, match="logprob_chunk"):
        GRPOConfig(logprob_chunk=0)
    with pytest.raises(ValueError, match="attention"):
        Qwen2ForCausalLM(tiny_config(), attention="flash")
    assert dataclasses.replace(GRPOConfig(), micro_batch_tokens=4096).micro_batch_tokens == 4096
