"""The settings of a GRPO update, `GRPOConfig`: the optimiser, the loss and its stabilisers, the
micro-batching. Plain data, checked when it is made; toolgrpo.learners.train.grpo_step runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from toolgrpo.learners import grpo


@dataclass(frozen=True)
class GRPOConfig:
    """Optimisation and loss settings of GRPO."""

    learning_rate: float = 5e-5
    """Peak learning rate of AdamW (on the LoRA parameters)."""
    warmup_steps: int = 10
    """Linear warm-up from 0 to the peak, in optimizer steps."""
    total_steps: int | None = None
    """Optimizer steps of the whole run (the cosine schedule's horizon). None: a training loop
    sets it from its number of steps x ppo_epochs; the optimizer needs it set."""
    schedule: str = "cosine"
    """"cosine" (decay to 10% of the peak after warm-up) or "constant"."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clipping."""
    micro_batch_size: int | None = 8
    """Episodes per forward/backward (rows of a micro-batch); gradients are accumulated over the
    batch. None: the whole batch at once."""
    micro_batch_tokens: int | None = None
    """Token budget of a micro-batch instead: rows x padded length <= this, so that a
    micro-batch of short episodes takes more of them (at most the batch). None: micro_batch_size
    rows whatever their length."""
    logprob_chunk: int = 1024
    """Positions whose full-vocabulary logits are computed at once (the loss never holds the
    [B, T, V] logits of a micro-batch)."""
    ppo_epochs: int = 1
    """Optimisation passes over one rollout batch."""
    target_kl: float | None = None
    """Stop a step's PPO epochs early: a pass whose approx_kl (the k3 estimate of KL(old ||
    current) over the batch's tokens, toolgrpo.learners.grpo.approx_kl) exceeds this is not applied, and
    the step ends (the first pass, at KL 0, always is). None: every epoch runs (as before).
    Only matters with ppo_epochs > 1; 0.01 to 0.05 is usual (Stable-Baselines3, OpenAI's PPO)."""
    max_log_ratio: float = grpo.MAX_LOG_RATIO
    """Bound of |logp - logp_old| before exp in the ratio (toolgrpo.learners.grpo.bounded_log_ratio): a
    policy that drifted over several epochs gives a finite loss. 20 (as verl) changes nothing
    short of a ratio of exp(20)."""
    eps_low: float = 0.2
    """Lower clip of the ratio (1 - eps_low)."""
    eps_high: float = 0.28
    """Upper clip (1 + eps_high); DAPO's clip-higher uses 0.28."""
    beta: float = 0.0
    """Weight of the k3 KL penalty to the base model (DeepSeekMath: 0.04; recent work: 0)."""
    aggregation: str = "seq-mean-token-mean"
    """Loss aggregation: one of toolgrpo.learners.grpo.AGGREGATIONS."""
    max_tokens: int | None = None
    """Constant normaliser of "seq-mean-token-sum-norm" (the generation budget)."""
    scale_by_std: bool = True
    """Divide advantages by the group's std (False: Dr. GRPO)."""
    baseline: Literal["mean", "leave-one-out"] = "mean"
    """What an episode's reward is compared with: its group's mean (GRPO), or the mean of the
    other episodes of its group ("leave-one-out": RLOO, an unbiased baseline; the advantages
    are the mean's times G / (G - 1)). toolgrpo.learners.grpo.group_advantages."""
    importance_ratio: Literal["token", "sequence"] = "token"
    """The PPO ratio per token (GRPO), or per episode ("sequence": GSPO's length-normalised
    sequence ratio, toolgrpo.learners.grpo.sequence_log_ratio; set eps_low/eps_high to a few 1e-4 as the
    paper does). Equal with one epoch (the ratio is 1); they differ with ppo_epochs > 1 or
    pipelined rollouts."""
    tis_cap: float | None = None
    """Truncated importance sampling against sampler_logprobs, capped at this weight. None: off."""
    max_skipped_updates: int = 3
    """An update whose loss or gradient is not finite is skipped; this many in a row stop the run
    (toolgrpo.agents.training.loop.NonFiniteUpdates), with nothing of them saved."""

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.aggregation not in grpo.AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {grpo.AGGREGATIONS}, got {self.aggregation!r}"
            )
        if self.aggregation == "seq-mean-token-sum-norm" and not self.max_tokens:
            raise ValueError("aggregation 'seq-mean-token-sum-norm' needs max_tokens")
        if self.learning_rate <= 0 or self.ppo_epochs < 1 or (self.total_steps or 1) < 1:
            raise ValueError("learning_rate, ppo_epochs and total_steps must be positive")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError(
                f"micro_batch_tokens must be >= 1 or None, got {self.micro_batch_tokens}"
            )
        if self.max_skipped_updates < 1:
            raise ValueError(f"max_skipped_updates must be >= 1, got {self.max_skipped_updates}")
        if self.logprob_chunk < 1:
            raise ValueError(f"logprob_chunk must be >= 1, got {self.logprob_chunk}")
        if self.baseline not in grpo.BASELINES:
            raise ValueError(f"baseline must be one of {grpo.BASELINES}, got {self.baseline!r}")
        if self.importance_ratio not in grpo.IMPORTANCE_RATIOS:
            raise ValueError(
                f"importance_ratio must be one of {grpo.IMPORTANCE_RATIOS}, got "
                f"{self.importance_ratio!r}"
            )
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"target_kl must be > 0 or None, got {self.target_kl}")
        if self.max_log_ratio <= 0:
            raise ValueError(f"max_log_ratio must be > 0, got {self.max_log_ratio}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(
                f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}"
            )
