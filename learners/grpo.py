"""GRPO as pure functions: group-relative advantages, per-token log-probabilities, the clipped
policy loss with its aggregation modes.

Sources:
* GRPO, outcome supervision: Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, section 4.1.
* Dr. GRPO (no std scaling, a constant length normaliser): Liu et al. 2025, arXiv 2503.20783.
* Clip-higher (separate eps_low / eps_high) and token-mean aggregation: DAPO, Yu et al. 2025,
  arXiv 2503.14476.
* Leave-one-out baseline (RLOO): Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for
  free!"; Ahmadian et al. 2024, "Back to basics", arXiv 2402.14740.
* Sequence-level importance ratios: Zheng et al. 2025, GSPO, arXiv 2507.18071.
* k3 KL estimator: Schulman 2020, "Approximating KL divergence"; used by DeepSeekMath (beta 0.04).
* Truncated importance sampling against the sampler's log-probabilities: Yao et al. 2025, "Your
  efficient RL framework secretly brings you off-policy RL training" (fengyao.notion.site).
* The log-ratio clamped before exp (as verl clamps it to [-20, 20]) and the k3 estimate of
  KL(old || new) as the early-stopping signal of PPO epochs (target_kl: Stable-Baselines3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
BASELINES = ("mean", "leave-one-out")
IMPORTANCE_RATIOS = ("token", "sequence")

MAX_LOG_RATIO = 20.0
"""Default bound of |logp - logp_old| before exp: exp(20) ~ 4.9e8 is finite in float32 (and in
bfloat16), exp(89) is not. A ratio that far from 1 is already clipped for any positive
advantage; for a negative one the bound keeps the loss finite (and its gradient zero there)."""


def bounded_log_ratio(logprobs, old_logprobs, mask, bound: float = MAX_LOG_RATIO):
    """clip(logp - logp_old, -bound, bound) on the mask, 0 off it, [B, T]. Without the bound,
    with ppo_epochs > 1 a policy that drifted far (logp - logp_old > 88 in float32) gives
    ratio = inf, and ratio * A = -inf for A < 0 wins the min of the clipped objective: an
    infinite loss. With it, the ratio is at most exp(bound)."""
    log_ratio = jnp.where(mask > 0, logprobs - old_logprobs, 0.0)
    return jnp.clip(log_ratio, -bound, bound)


def approx_kl(log_ratio, mask, n_tokens=None):
    """The k3 estimate of KL(pi_old || pi) over the masked tokens (Schulman 2020, "Approximating
    KL divergence": for x ~ q and r = p(x) / q(x), k3 = (r - 1) - log r is unbiased for
    KL(q || p) and never negative). Here q = pi_old (the tokens were sampled by it) and
    log r = logp - logp_old, so per token k3 = exp(log r) - 1 - log r, averaged over the mask
    (over `n_tokens` when given: a micro-batch's share of the batch's mean)."""
    mask = mask.astype(jnp.float32)
    k3 = jnp.exp(log_ratio) - 1.0 - log_ratio
    n = jnp.maximum(mask.sum(), 1.0) if n_tokens is None else n_tokens
    return jnp.sum(k3 * mask) / n


def k3_to_reference(logprobs, ref_logprobs, mask):
    """Per-token k3 estimate of KL(pi || pi_ref), [B, T] (0 off the mask): with
    d = logp_ref - logp, exp(d) - d - 1 >= 0 (the penalty of DeepSeekMath's GRPO)."""
    d = jnp.where(mask > 0, ref_logprobs - logprobs, 0.0)
    return jnp.exp(d) - d - 1.0


def _group_index(group_ids):
    """Dense group indices 0..G-1 (G <= B) for arbitrary integer ids; jit-compatible."""
    b = group_ids.shape[0]
    _, index = jnp.unique(group_ids, return_inverse=True, size=b)
    return index.reshape(-1), b


def group_stats(rewards, group_ids):
    """Per-episode mean and std (Bessel-corrected, as TRL and verl) of its group's rewards, and
    whether its group has zero variance (such a group carries no learning signal)."""
    rewards = jnp.asarray(rewards, jnp.float32)
    index, n = _group_index(jnp.asarray(group_ids))
    count = jax.ops.segment_sum(jnp.ones_like(rewards), index, n)
    mean = jax.ops.segment_sum(rewards, index, n) / jnp.maximum(count, 1)
    sq = jax.ops.segment_sum((rewards - mean[index]) ** 2, index, n)
    std = jnp.sqrt(sq / jnp.maximum(count - 1, 1))
    zero_var = sq[index] <= 1e-12
    return mean[index], std[index], zero_var


def group_advantages(
    rewards, group_ids, scale_by_std: bool = True, eps: float = 1e-6, baseline: str = "mean"
):
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps), one advantage per episode
    (DeepSeekMath's outcome supervision; every token of episode i gets A_i). With
    scale_by_std=False: A_i = r_i - mean(r_group) (Dr. GRPO), which does not up-weight groups
    whose rewards barely differ.

    baseline="leave-one-out" (RLOO) compares each episode with the mean of the *other* G - 1
    episodes of its group, a baseline independent of r_i (so the estimate is unbiased):

        b_i = (sum_j r_j - r_i) / (G - 1),   A_i = r_i - b_i = G / (G - 1) * (r_i - mean)

    (then divided by std + eps where scale_by_std); a group of one episode gets A_i = 0."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    rewards = jnp.asarray(rewards, jnp.float32)
    mean, std, _ = group_stats(rewards, group_ids)
    adv = rewards - mean
    if baseline == "leave-one-out":
        index, n = _group_index(jnp.asarray(group_ids))
        count = jax.ops.segment_sum(jnp.ones_like(rewards), index, n)[index]
        adv = jnp.where(count > 1, adv * count / jnp.maximum(count - 1, 1), 0.0)
    return adv / (std + eps) if scale_by_std else adv


def sequence_log_ratio(log_ratio_bt, mask_bt):
    """GSPO's length-normalised sequence log-ratio, [B] (arXiv 2507.18071, eq. 7):

        log s_i = (1 / |y_i|) sum_t (logp_{i,t} - logp_old_{i,t})   over the sampled tokens,

    s_i = (pi(y_i) / pi_old(y_i)) ** (1 / |y_i|); a row without sampled tokens gets 0."""
    mask = mask_bt.astype(jnp.float32)
    return jnp.sum(log_ratio_bt * mask, -1) / jnp.maximum(mask.sum(-1), 1.0)


def token_logprobs(logits_btv, tokens_bt):
    """log p(tokens[t] | tokens[<t]) at position t, [B, T]; position 0 (no context) is 0."""
    logp = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0)))


def token_entropy(logits_btv):
    """Entropy of the next-token distribution that predicted position t, [B, T] (0 at t=0)."""
    logp = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.pad(ent, ((0, 0), (1, 0)))


def token_logprobs_from_hidden(
    hidden_btd, output_embedding_vd, tokens_bt, chunk: int = 1024, entropy: bool = False
):
    """What `token_logprobs` (and, with `entropy`, `token_entropy`) give, from the final hidden
    states [B, T, D] and the output embedding [V, D] (logits = hidden @ embedding.T), without
    the [B, T, V] logits: `chunk` positions at a time, under a scan, each chunk's logits
    recomputed in the backward pass (jax.checkpoint). Live memory is O(chunk V), not O(B T V).
    Returns (logprobs [B, T], entropy [B, T] or None); the entropy carries no gradient."""
    b, t, d = hidden_btd.shape
    n = b * t
    chunk = max(1, min(chunk, n))
    # position t predicts token t+1; the last position of a row predicts nothing (target 0)
    targets = jnp.concatenate([tokens_bt[:, 1:], jnp.zeros((b, 1), tokens_bt.dtype)], axis=1)
    pad = -n % chunk
    h = jnp.pad(hidden_btd.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
    y = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)
    w = output_embedding_vd.astype(hidden_btd.dtype)

    @jax.checkpoint
    def one_chunk(h_cd, y_c):
        logits = jnp.dot(h_cd, w.T, preferred_element_type=jnp.float32)  # [chunk, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0] - lse
        if not entropy:
            return picked, jnp.zeros_like(picked)
        fixed, fixed_lse = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(lse)
        ent = fixed_lse - jnp.sum(jax.nn.softmax(fixed, axis=-1) * fixed, axis=-1)
        return picked, ent

    if h.shape[0] == 1:  # one chunk: no loop
        logp, ent = (x[None] for x in one_chunk(h[0], y[0]))
    else:
        _, (logp, ent) = jax.lax.scan(lambda c, xs: (c, one_chunk(*xs)), None, (h, y))
    shift = lambda x: jnp.pad(x.reshape(-1)[:n].reshape(b, t)[:, :-1], ((0, 0), (1, 0)))
    return shift(logp), (shift(ent) if entropy else None)


def aggregate(
    per_token_bt,
    mask_bt,
    aggregation: str,
    max_tokens: int | None = None,
    *,
    n_tokens=None,
    n_seqs=None,
):
    """Reduce a per-token loss to a scalar over the tokens where mask == 1.
    "seq-mean-token-mean": mean over each sequence's tokens, then over sequences (GRPO);
    "token-mean": mean over all tokens of the batch (DAPO);
    "seq-mean-token-sum-norm": each sequence's sum divided by the constant `max_tokens`, then the
    mean over sequences (Dr. GRPO).
    When the rows are one micro-batch of a larger batch, `n_tokens` (its masked tokens) and
    `n_seqs` (its rows with any) are the whole batch's: the result is then this micro-batch's
    share, and the shares of all micro-batches sum to the whole batch's value exactly."""
    mask = mask_bt.astype(jnp.float32)
    if aggregation == "token-mean":
        n = jnp.maximum(mask.sum(), 1.0) if n_tokens is None else n_tokens
        return jnp.sum(per_token_bt * mask) / n
    seq_tokens = mask.sum(-1)
    has = (seq_tokens > 0).astype(jnp.float32)
    n_seq = jnp.maximum(has.sum(), 1.0) if n_seqs is None else n_seqs
    if aggregation == "seq-mean-token-mean":
        per_seq = jnp.sum(per_token_bt * mask, -1) / jnp.maximum(seq_tokens, 1.0)
        return jnp.sum(per_seq * has) / n_seq
    if aggregation == "seq-mean-token-sum-norm":
        if not max_tokens:
            raise ValueError(
                "aggregation 'seq-mean-token-sum-norm' needs max_tokens, the "
                "constant normaliser (the generation budget)"
            )
        return jnp.sum(jnp.sum(per_token_bt * mask, -1) / max_tokens * has) / n_seq
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    loss_mask,
    *,
    eps_low: float,
    eps_high: float,
    aggregation: str = "seq-mean-token-mean",
    max_tokens: int | None = None,
    ref_logprobs=None,
    beta: float = 0.0,
    sampler_logprobs=None,
    tis_cap: float | None = None,
    entropy=None,
    n_tokens=None,
    n_seqs=None,
    max_log_ratio: float = MAX_LOG_RATIO,
    importance_ratio: str = "token",
):
    """The clipped GRPO objective, as a loss to minimise. Per token t of episode i:

        ratio = exp(clip(logp - logp_old, -max_log_ratio, max_log_ratio))   (bounded_log_ratio)
        l_t = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_t
        KL_t = exp(logp_ref - logp) - (logp_ref - logp) - 1                 (k3_to_reference)

    importance_ratio="sequence" (GSPO, arXiv 2507.18071) uses one ratio per episode instead,
    s_i = exp(sequence_log_ratio), for every token of episode i: with "seq-mean-token-mean" the
    loss is GSPO's -min(s_i A_i, clip(s_i) A_i) averaged over episodes, and its gradient is
    GSPO's (s_i times the mean gradient of the episode's log-probabilities). GSPO clips this
    ratio far tighter than a token's (eps_low 3e-4, eps_high 4e-4 in the paper).

    With `tis_cap`, l_t is weighted by min(exp(logp_old - logp_sampler), tis_cap) (no gradient):
    truncated importance sampling for the gap between the sampler and the learner. Only tokens
    with loss_mask == 1 count. Arrays are [B, T]; `advantages` is [B]. Returns (loss, aux);
    aux["approx_kl"] is the k3 estimate of KL(old || new) (`approx_kl`), 0 when old == new.
    With `n_tokens` and `n_seqs` (the whole batch's counts, see `aggregate`) the loss and every
    token mean in aux are this micro-batch's share of the batch's."""
    mask = loss_mask.astype(jnp.float32)
    adv = advantages[:, None].astype(jnp.float32)
    if importance_ratio not in IMPORTANCE_RATIOS:
        raise ValueError(
            f"importance_ratio must be one of {IMPORTANCE_RATIOS}, got {importance_ratio!r}"
        )
    log_ratio = bounded_log_ratio(logprobs, old_logprobs, mask, max_log_ratio)
    if importance_ratio == "sequence":
        ratio = jnp.exp(sequence_log_ratio(log_ratio, mask))[:, None] * mask
    else:
        ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    aux = {}
    if tis_cap is not None:
        if sampler_logprobs is None:
            raise ValueError("tis_cap needs sampler_logprobs")
        weight = jnp.minimum(
            jnp.exp(jnp.where(mask > 0, old_logprobs - sampler_logprobs, 0.0)), tis_cap
        )
        per_token = per_token * jax.lax.stop_gradient(weight)
        aux["tis_weight_mean"] = jnp.sum(weight * mask) / (
            jnp.maximum(mask.sum(), 1.0) if n_tokens is None else n_tokens
        )
    kl = None if ref_logprobs is None else k3_to_reference(logprobs, ref_logprobs, mask)
    if beta:
        if kl is None:
            raise ValueError("beta > 0 needs ref_logprobs (the base model's, adapters off)")
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, max_tokens, n_tokens=n_tokens, n_seqs=n_seqs)
    n = jnp.maximum(mask.sum(), 1.0) if n_tokens is None else n_tokens
    token_mean = lambda x: jnp.sum(x * mask) / n
    aux.update(
        loss=loss,
        clip_frac_low=token_mean(((ratio < 1.0 - eps_low) & (adv < 0)).astype(jnp.float32)),
        clip_frac_high=token_mean(((ratio > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)),
        ratio_mean=token_mean(ratio),
        approx_kl=approx_kl(jax.lax.stop_gradient(log_ratio), mask, n_tokens),
        advantage_mean=jnp.mean(advantages),
        advantage_std=jnp.std(advantages),
    )
    if kl is not None:
        aux["kl"] = token_mean(kl)
    if sampler_logprobs is not None:
        aux["sampler_learner_gap"] = token_mean(jnp.abs(old_logprobs - sampler_logprobs))
    if entropy is not None:
        aux["entropy"] = token_mean(entropy)
    return loss, aux
