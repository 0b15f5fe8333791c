"""GRPO math against hand-computed values, and the train step on a tiny model."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_base_model, tiny_model

from toolgrpo.learners import grpo
from toolgrpo.learners.batch import TrainBatch
from toolgrpo.learners.lora import apply_lora
from toolgrpo.learners.train import GRPOConfig, grpo_step, init_state, sequence_logprobs

S3 = math.sqrt(3) / 2  # (1 - 0.5) / sqrt(1/3): rewards [0, 1, 1, 0] in one group


def test_group_advantages_by_hand():
    np.testing.assert_allclose(
        grpo.group_advantages([0, 1, 1, 0], [5, 5, 5, 5]), [-S3, S3, S3, -S3], atol=1e-5
    )
    np.testing.assert_allclose(
        grpo.group_advantages([0, 1, 1, 0], [5, 5, 5, 5], scale_by_std=False),
        [-0.5, 0.5, 0.5, -0.5],
    )
    two = grpo.group_advantages([0, 1, 1, 0, 2, 2], [7, 7, 3, 3, 9, 9])
    r = 1 / math.sqrt(2)  # a group of two, rewards 0 and 1: std sqrt(0.5)
    np.testing.assert_allclose(two, [-r, r, r, -r, 0, 0], atol=1e-5)
    _, _, zero_var = grpo.group_stats([0, 1, 1, 0, 2, 2], [7, 7, 3, 3, 9, 9])
    assert list(np.asarray(zero_var)) == [False] * 4 + [True] * 2


def test_aggregations_by_hand():
    per_token = jnp.array([[-1.0, -1.0, 9.0], [1.0, 9.0, 9.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    assert float(grpo.aggregate(per_token, mask, "seq-mean-token-mean")) == pytest.approx(0.0)
    assert float(grpo.aggregate(per_token, mask, "token-mean")) == pytest.approx(-1 / 3)
    assert float(grpo.aggregate(per_token, mask, "seq-mean-token-sum-norm", 4)) == pytest.approx(
        (-2 / 4 + 1 / 4) / 2
    )
    with pytest.raises(ValueError, match="max_tokens"):
        grpo.aggregate(per_token, mask, "seq-mean-token-sum-norm")


def test_policy_loss_ratio_one_clipping_and_kl_by_hand():
    mask = jnp.ones((2, 1))
    adv = jnp.array([1.0, -1.0])
    logp = jnp.log(jnp.array([[0.3], [0.3]]))
    loss, aux = grpo.policy_loss(
        logp, logp, adv, mask, eps_low=0.2, eps_high=0.28, aggregation="token-mean"
    )
    assert float(loss) == pytest.approx(0.0) and float(aux["ratio_mean"]) == pytest.approx(1.0)
    # ratio 1.5 with A=+1 is clipped at 1 + eps_high; ratio 0.5 with A=-1 at 1 - eps_low
    new = jnp.log(jnp.array([[0.45], [0.15]]))
    loss, aux = grpo.policy_loss(
        new, logp, adv, mask, eps_low=0.2, eps_high=0.2, aggregation="token-mean"
    )
    assert float(loss) == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6)
    assert float(aux["clip_frac_high"]) == 0.5 and float(aux["clip_frac_low"]) == 0.5
    ref = jnp.log(jnp.array([[0.225], [0.075]]))  # half the policy's probability everywhere
    loss_kl, aux = grpo.policy_loss(
        new,
        logp,
        adv,
        mask,
        eps_low=0.2,
        eps_high=0.2,
        aggregation="token-mean",
        ref_logprobs=ref,
        beta=0.1,
    )
    k3 = 0.5 - math.log(0.5) - 1  # exp(d) - d - 1 with d = log 0.5
    assert float(aux["kl"]) == pytest.approx(k3, abs=1e-6)
    assert float(loss_kl - loss) == pytest.approx(0.1 * k3, abs=1e-6)


def test_truncated_importance_sampling_weights():
    mask = jnp.ones((1, 2))
    logp = jnp.log(jnp.array([[0.5, 0.5]]))
    sampler = jnp.log(jnp.array([[0.25, 0.5]]))  # weights min(2, cap) and 1
    loss, aux = grpo.policy_loss(
        logp,
        logp,
        jnp.array([1.0]),
        mask,
        eps_low=0.2,
        eps_high=0.28,
        aggregation="token-mean",
        sampler_logprobs=sampler,
        tis_cap=1.5,
    )
    assert float(loss) == pytest.approx(-(1.5 + 1.0) / 2)
    assert float(aux["sampler_learner_gap"]) == pytest.approx(math.log(2) / 2, abs=1e-6)


def test_masked_tokens_and_zero_advantages_give_no_gradient():
    rng = np.random.default_rng(0)
    logp = jnp.asarray(np.log(rng.uniform(0.1, 0.9, (3, 5))), jnp.float32)
    old = logp + 0.1
    mask = jnp.array([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    for agg in grpo.AGGREGATIONS:
        g = jax.grad(
            lambda lp, agg=agg: grpo.policy_loss(
                lp,
                old,
                jnp.array([1.0, -2.0, 0.5]),
                mask,
                eps_low=0.2,
                eps_high=0.28,
                aggregation=agg,
                max_tokens=5,
            )[0]
        )(logp)
        assert np.all(np.asarray(g)[np.asarray(mask) == 0] == 0), agg
        assert np.any(np.asarray(g)[np.asarray(mask) == 1] != 0), agg
        g0 = jax.grad(
            lambda lp, agg=agg: grpo.policy_loss(
                lp,
                old,
                jnp.zeros(3),
                mask,
                eps_low=0.2,
                eps_high=0.28,
                aggregation=agg,
                max_tokens=5,
            )[0]
        )(logp)
        assert np.all(np.asarray(g0) == 0), agg


def test_token_logprobs_match_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (2, 4, 7))
    tokens = jnp.array([[1, 2, 3, 4], [6, 5, 0, 1]])
    lp = grpo.token_logprobs(logits, tokens)
    expect = jax.nn.log_softmax(logits[1, 2])[1]
    assert float(lp[1, 3]) == pytest.approx(float(expect), abs=1e-6) and float(lp[0, 0]) == 0


def test_a_few_steps_raise_the_rewarded_completion():
    """Two completions of one prompt; the first is rewarded. Its log-probability must rise, the
    other's fall, the first pass's ratio is exactly 1, and the base model stays frozen."""
    tokens = jnp.array([[1, 2, 3, 10, 11, 12, 0], [1, 2, 3, 20, 21, 22, 0]], jnp.int32)
    loss_mask = jnp.array([[0, 0, 0, 1, 1, 1, 0]] * 2, jnp.float32)
    batch = TrainBatch(
        tokens, loss_mask, rewards=jnp.array([1.0, 0.0]), group_ids=jnp.array([0, 0])
    )
    cfg = GRPOConfig(
        learning_rate=3e-3, warmup_steps=1, schedule="constant", ppo_epochs=2, micro_batch_size=1
    )
    state = init_state(tiny_model(), cfg)
    rest_before = jax.tree.map(np.asarray, state.rest)

    def completion_logprob(s):
        lp = sequence_logprobs(s, tokens, jnp.ones_like(tokens))
        return np.asarray(jnp.sum(lp * loss_mask, -1))

    before = completion_logprob(state)
    for _ in range(5):
        state, metrics = grpo_step(state, batch, cfg)
        assert metrics["first_pass_ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    after = completion_logprob(state)
    assert after[0] > before[0] + 0.5 and after[1] < before[1] - 0.5, (before, after)
    assert int(state.updates) == 5 and metrics["grad_norm"] > 0  # one update a grpo_step
    assert int(state.opt_state[1][0].count) == 10  # two optimizer steps each (ppo_epochs 2)
    for a, b in zip(jax.tree.leaves(rest_before), jax.tree.leaves(state.rest)):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.slow
def test_micro_batches_accumulate_to_the_full_batch_gradient():
    tokens = jax.random.randint(jax.random.key(1), (4, 6), 0, 32)
    batch = TrainBatch(
        tokens,
        jnp.ones((4, 6)).at[:, :2].set(0),
        rewards=jnp.array([1.0, 0.0, 0.5, 0.0]),
        group_ids=jnp.array([0, 0, 1, 1]),
    )
    results = []
    for mbs in (None, 2):
        cfg = GRPOConfig(
            learning_rate=1e-3,
            warmup_steps=1,
            schedule="constant",
            micro_batch_size=mbs,
            aggregation="token-mean",
        )
        state, metrics = grpo_step(init_state(tiny_model(), cfg), batch, cfg)
        results.append((jax.tree.leaves(state.lora), metrics["grad_norm"]))
    # equal-sized micro-batches with equal token counts: the mean of their losses is the loss
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-4)
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="aggregation"):
        GRPOConfig(aggregation="mean")
    with pytest.raises(ValueError, match="max_tokens"):
        GRPOConfig(aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="LoRA"):
        init_state(tiny_base_model(), GRPOConfig())


def test_bf16_compute_keeps_lora_and_optimizer_state_fp32():
    model = tiny_base_model(
        dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=True
    )  # base frozen in bf16, remat on
    apply_lora(model, rank=4, alpha=8, param_dtype=jnp.float32)
    cfg = GRPOConfig(learning_rate=1e-2, warmup_steps=1, schedule="constant")
    state = init_state(model, cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 32)
    batch = TrainBatch(
        tokens, jnp.ones((2, 6)), rewards=jnp.array([1.0, 0.0]), group_ids=jnp.array([0, 0])
    )
    state, metrics = grpo_step(state, batch, cfg)
    assert {x.dtype for x in jax.tree.leaves(state.lora)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.rest)} == {jnp.dtype(jnp.bfloat16)}
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


@pytest.mark.slow
def test_one_epoch_needs_no_old_logprob_pass():
    """With ppo_epochs 1 the loss takes the update's own log-probabilities, held constant, as the
    old ones: the same loss and gradient as with a separate pass over the same parameters."""
    from toolgrpo.learners.batch import MicroBatch
    from toolgrpo.learners.train import _loss  # the loss of one pass, tested as such

    tokens = jax.random.randint(jax.random.key(2), (4, 6), 0, 32)
    cfg = GRPOConfig(learning_rate=1e-3, warmup_steps=1, schedule="constant")
    state = init_state(tiny_model(), cfg)
    loss_mask = jnp.ones((4, 6)).at[:, :2].set(0)
    mb = MicroBatch(tokens, loss_mask, jnp.array([1.0, -1.0, 0.5, -0.5]))
    with_pass = dataclasses.replace(mb, old_logprobs=sequence_logprobs(state, tokens))
    grad = jax.value_and_grad(_loss, has_aux=True)
    totals = (jnp.float32(16), jnp.float32(4))
    (loss_a, aux_a), grads_a = grad(state.lora, state, mb, totals, cfg)
    (loss_b, _aux_b), grads_b = grad(state.lora, state, with_pass, totals, cfg)
    assert float(aux_a["ratio_mean"]) == 1.0
    # float32: the two passes may differ in the last bits of each log-probability
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale)
    _, metrics = grpo_step(
        state,
        TrainBatch(
            tokens,
            loss_mask,
            rewards=jnp.array([1.0, 0.0, 0.5, 0.0]),
            group_ids=jnp.array([0, 0, 1, 1]),
        ),
        cfg,
    )
    assert metrics["first_pass_ratio_mean"] == 1.0


def test_a_non_finite_update_is_skipped_bit_for_bit():
    """A NaN loss (a NaN reward) or a NaN step (a NaN learning rate, past the config's check)
    leaves the parameters and the optimizer state exactly as they were, and is counted."""
    tokens = jax.random.randint(jax.random.key(3), (4, 6), 0, 32)
    mask = jnp.ones((4, 6)).at[:, :2].set(0)
    good = TrainBatch(
        tokens, mask, rewards=jnp.array([1.0, 0.0, 0.5, 0.0]), group_ids=jnp.array([0, 0, 1, 1])
    )
    nan_reward = dataclasses.replace(good, rewards=jnp.array([1.0, jnp.nan, 0.5, 0.0]))
    cfg = GRPOConfig(learning_rate=1e-3, warmup_steps=1, schedule="constant", ppo_epochs=2)
    nan_lr = GRPOConfig(learning_rate=1e-3, warmup_steps=1, schedule="constant")
    object.__setattr__(nan_lr, "learning_rate", float("nan"))  # what the config would refuse
    state, metrics = grpo_step(init_state(tiny_model(), cfg), good, cfg)
    assert metrics["skipped_updates"] == 0
    for batch, c in ((nan_reward, cfg), (good, nan_lr)):
        after, metrics = grpo_step(state, batch, c)
        assert metrics["skipped_updates"] == 1 and int(after.updates) == int(state.updates) + 1
        for a, b in zip(
            jax.tree.leaves((state.lora, state.opt_state)),
            jax.tree.leaves((after.lora, after.opt_state)),
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    after, metrics = grpo_step(state, good, cfg)  # and the next finite update is taken
    assert metrics["skipped_updates"] == 0 and np.isfinite(metrics["loss"])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(after.lora))


def test_a_forced_drift_with_a_negative_advantage_gives_a_finite_loss():
    """logp - logp_old = 100 (a policy that drifted over epochs): exp(100) is inf in float32,
    and with A = -1 the unclipped term -inf wins the min. The bounded log-ratio keeps the
    loss at exp(20) * 1 and the gradient finite (zero where the bound holds)."""
    mask = jnp.ones((1, 2))
    old = jnp.log(jnp.array([[1e-30, 0.5]]))
    logp = old + jnp.array([[100.0, 0.0]])
    assert not np.isfinite(float(jnp.exp(logp - old)[0, 0]))  # what an unbounded ratio gives
    lr = grpo.bounded_log_ratio(logp, old, mask)
    np.testing.assert_allclose(np.asarray(lr), [[20.0, 0.0]], atol=1e-4)
    loss_fn = lambda lp: grpo.policy_loss(
        lp, old, jnp.array([-1.0]), mask, eps_low=0.2, eps_high=0.28, aggregation="token-mean"
    )
    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(logp)
    # per token -min(r A, clip(r) A) with A = -1: r for both tokens; mean of e^20 and 1
    assert float(loss) == pytest.approx((math.exp(20.0) + 1.0) / 2, rel=1e-4)
    assert np.isfinite(np.asarray(grad)).all() and float(grad[0, 0]) == 0.0
    assert np.isfinite(float(aux["approx_kl"]))


def test_approx_kl_is_k3_by_hand():
    """k3 = exp(d) - 1 - d per token, d = logp - logp_old, averaged over the mask."""
    old = np.log(np.array([[0.5, 0.2, 0.9], [0.3, 0.3, 0.3]]))
    new = np.log(np.array([[0.25, 0.4, 0.1], [0.6, 0.3, 0.3]]))
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    d = (new - old)[mask == 1]
    expect = np.mean(np.exp(d) - 1 - d)
    got = grpo.approx_kl(grpo.bounded_log_ratio(new, old, jnp.asarray(mask)), jnp.asarray(mask))
    assert float(got) == pytest.approx(expect, rel=1e-5) and expect > 0
    _, aux = grpo.policy_loss(
        jnp.asarray(new, jnp.float32),
        jnp.asarray(old, jnp.float32),
        jnp.array([1.0, -1.0]),
        jnp.asarray(mask),
        eps_low=0.2,
        eps_high=0.28,
    )
    assert float(aux["approx_kl"]) == pytest.approx(expect, rel=1e-5)
    same = grpo.approx_kl(grpo.bounded_log_ratio(old, old, jnp.asarray(mask)), jnp.asarray(mask))
    assert float(same) == 0.0


def test_target_kl_stops_the_epochs_of_a_step():
    """ppo_epochs 3 at a high learning rate: each later pass reports its approx_kl; with a
    target_kl below the drift of pass 1, only the first pass is applied."""
    tokens = jnp.array([[1, 2, 3, 10, 11, 12], [1, 2, 3, 20, 21, 22]], jnp.int32)
    loss_mask = jnp.array([[0, 0, 0, 1, 1, 1]] * 2, jnp.float32)
    batch = TrainBatch(
        tokens, loss_mask, rewards=jnp.array([1.0, 0.0]), group_ids=jnp.array([0, 0])
    )
    base = GRPOConfig(learning_rate=3e-2, warmup_steps=1, schedule="constant", ppo_epochs=3)
    # (the schedule's first step has learning rate 0: the warm-up starts at 0)
    state, _ = grpo_step(init_state(tiny_model(), base), batch, base)
    _, every = grpo_step(state, batch, base)
    assert every["ppo_epochs_done"] == 3
    assert every["approx_kl_pass_1"] > 0 and every["approx_kl_pass_2"] > 0
    cfg = dataclasses.replace(base, target_kl=every["approx_kl_pass_1"] / 2)
    after, stopped = grpo_step(state, batch, cfg)
    assert stopped["ppo_epochs_done"] == 1 and "approx_kl_pass_2" not in stopped
    assert stopped["approx_kl_pass_1"] == pytest.approx(every["approx_kl_pass_1"], rel=1e-4)
    assert int(after.opt_state[1][0].count) == 4 and int(after.updates) == 2
    with pytest.raises(ValueError, match="target_kl"):
        GRPOConfig(target_kl=0.0)


def test_leave_one_out_advantages_by_hand():
    """RLOO: A_i = r_i - mean of the other episodes of the group; a group of one gets 0."""
    rewards = np.array([0.0, 1.0, 1.0, 0.5, 3.0, 2.0, 4.0])
    groups = np.array([4, 4, 4, 4, 1, 1, 9])
    expect = []
    for r, g in zip(rewards, groups):
        others = [x for x, h in zip(rewards, groups) if h == g]
        others.remove(r)
        expect.append(r - np.mean(others) if others else 0.0)
    np.testing.assert_allclose(expect[:4], [-5 / 6, 0.5, 0.5, -1 / 6])  # (the hand values)
    got = grpo.group_advantages(rewards, groups, scale_by_std=False, baseline="leave-one-out")
    np.testing.assert_allclose(np.asarray(got), expect, atol=1e-6)
    scaled = grpo.group_advantages(rewards, groups, baseline="leave-one-out")
    std = np.array(
        [np.std(rewards[groups == g], ddof=1) if (groups == g).sum() > 1 else 0 for g in groups]
    )
    np.testing.assert_allclose(np.asarray(scaled), np.array(expect) / (std + 1e-6), rtol=1e-5)
    from toolgrpo.learners.batch import (
        micro_batches,  # the train step's advantages take the setting
    )

    batch = TrainBatch(np.ones((7, 4), np.int32), np.ones((7, 4)), rewards, groups)
    cfg = GRPOConfig(baseline="leave-one-out", scale_by_std=False, micro_batch_size=None)
    (mb,), _, _ = micro_batches(batch, cfg)
    np.testing.assert_allclose(np.asarray(mb.advantages), expect, atol=1e-6)
    with pytest.raises(ValueError, match="baseline"):
        grpo.group_advantages(rewards, groups, baseline="median")
    with pytest.raises(ValueError, match="baseline"):
        GRPOConfig(baseline="median")  # ty: ignore[invalid-argument-type] - deliberately bad


def test_sequence_level_ratio_by_hand():
    """GSPO: s_i = exp(mean over episode i's sampled tokens of logp - logp_old), the same for all
    its tokens; loss = mean over episodes of -min(s_i A_i, clip(s_i) A_i); its gradient on
    token t of episode i is -A_i s_i / |y_i| / n_episodes where the ratio is not clipped."""
    old = np.log(np.array([[0.5, 0.4, 0.3, 0.9], [0.2, 0.2, 0.6, 0.6]]))
    new = old + np.array([[0.02, -0.01, 0.05, 9.0], [0.1, 0.3, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv = np.array([1.0, -1.0])
    log_s = np.array([(0.02 - 0.01 + 0.05) / 3, (0.1 + 0.3) / 2])
    s = np.exp(log_s)  # 1.0202 (inside 1 + 0.28) and 1.2214 (A < 0: unclipped term wins)
    expect = np.mean(-np.minimum(s * adv, np.clip(s, 0.8, 1.28) * adv))
    j = lambda x: jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(
        np.asarray(grpo.sequence_log_ratio(j(new - old), j(mask))), log_s, rtol=1e-5
    )
    loss_fn = lambda lp, kind: grpo.policy_loss(
        lp, j(old), j(adv), j(mask), eps_low=0.2, eps_high=0.28, importance_ratio=kind
    )
    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(j(new), "sequence")
    assert float(loss) == pytest.approx(expect, rel=1e-5)
    assert float(aux["ratio_mean"]) == pytest.approx((3 * s[0] + 2 * s[1]) / 5, rel=1e-5)
    expect_grad = (-adv * s / mask.sum(-1) / 2)[:, None] * mask
    np.testing.assert_allclose(np.asarray(grad), expect_grad, rtol=1e-4, atol=1e-7)
    token_loss, _ = loss_fn(j(new), "token")
    assert abs(float(token_loss) - expect) > 1e-3  # the token-level ratio is another loss
    # with old == new (one epoch) both ratios are 1 and the gradients agree
    g_seq = jax.grad(lambda lp: loss_fn(lp, "sequence")[0])(j(old))
    g_tok = jax.grad(lambda lp: loss_fn(lp, "token")[0])(j(old))
    np.testing.assert_allclose(np.asarray(g_seq), np.asarray(g_tok), atol=1e-6)
    with pytest.raises(ValueError, match="importance_ratio"):
        loss_fn(j(new), "episode")
