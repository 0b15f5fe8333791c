"""The training-health monitor: each step, signals computed from the metrics the loop already
logs, and a one-line warning naming the problem when one crosses its threshold.

    monitor = HealthMonitor(HealthConfig(), group_size=8)
    flags, warnings = monitor.observe(step, metrics)   # flags: {"health/<signal>": 0 or 1, ...}
    for w in warnings:
        print(w.message)     # "entropy collapse: ..."

`fit` runs one (its `health` argument): the flags go into the step's metrics (metrics.jsonl,
W&B), each warning to the `toolgrpo.agents` log and the progress bar. The monitor only warns;
it never changes training. docs/training_issues.md has each failure mode, its signal and the
settings that mitigate it.

Every signal is a pure function of the steps seen so far (`history`, oldest first, each a
step's metrics dict) and the settings, returning a message or None. A level signal (collapse,
truncation, a dead batch, a sampler gap) must hold for `patience` steps in a row; a spike
(tool errors, gradient norm) compares the step with the `window` steps before it; a trend
(reward hacking) compares the last `window` steps with the `window` before them. A signal whose
metrics a step lacks is not raised. After a resume the history starts again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

History = Sequence[Mapping[str, float]]


@dataclass(frozen=True)
class HealthConfig:
    """Thresholds of the training-health signals (docs/training_issues.md explains each)."""

    enabled: bool = True
    """Run the monitor (it only warns)."""
    window: int = 5
    """Steps of history a spike compares with, and the length of each half of a trend."""
    patience: int = 2
    """Steps in a row a level signal must hold before it warns (one noisy step does not)."""
    collapse_distinct: float = 1.5
    """Group collapse: at most this many distinct completions per group on average (1 is a
    group of copies; the first collection's, before dynamic sampling drops any)."""
    entropy_floor: float = 0.1
    """Entropy collapse: the policy's token entropy below this fraction of its mean over the
    first `window` steps."""
    hacking_rise: float = 0.2
    """Reward hacking: a shaping reward's mean (unweighted, 0-1) up by at least this much from
    one window to the next while accuracy rises by at most `hacking_flat`."""
    hacking_flat: float = 0.02
    """Reward hacking: the most accuracy may rise over the same windows."""
    shaping_rewards: tuple[str, ...] = ("format", "tool_use")
    """The reward components watched for hacking (the environment's info["reward_components"]
    names); correctness is what they must not rise without."""
    tool_error_spike: float = 0.25
    """Tool-error spike: the share of tool calls that failed, up by at least this much from the
    mean of the `window` steps before."""
    max_truncation: float = 0.3
    """High truncation: at least this share of episodes cut by a turn or token budget."""
    solved_accuracy: float = 0.9
    """Group and entropy collapse stay quiet while the training accuracy is at least this for
    the `patience` steps: a policy that solves its problems converges on one solution, so its
    groups are copies and its entropy falls (the offline demo, seed 1: 1.25-1.5 distinct
    completions a group of 8 at accuracy 0.94-0.97)."""
    dead_batch: float = 0.85
    """Dead batch: at least this share of the trained batch's groups have one reward for all
    (no gradient), after dynamic sampling's refills. A healthy offline demo without dynamic
    sampling peaks at 0.75 for two steps in a row (6 of 8 groups, late in a run that solves
    most problems); a run whose budget cuts every tool episode sits at 0.875-1."""
    max_sampler_gap: float = 0.1
    """Sampler/learner gap: the mean |log p_sampler - log p_learner| over sampled tokens above
    this (the sampler's numerics or its adapter differ from the learner's)."""
    grad_spike: float = 5.0
    """Gradient-norm spike: the step's norm (before clipping) at least this many times the
    median of the `window` steps before."""
    grad_spike_floor: float = 1.0
    """Gradient-norm spike: only a norm above this counts (grpo.max_grad_norm's default, which
    clips what is above it). Late in a run that solves most problems, most groups carry no
    gradient and the norm's median falls: the demo's seed 1 went from a median of 0.07 to 0.68
    on a step with more informative groups, a relative spike but a small update."""

    def __post_init__(self):
        if self.window < 1 or self.patience < 1:
            raise ValueError(
                f"health.window and health.patience must be >= 1, got {self.window}, "
                f"{self.patience}"
            )
        if not 0 < self.entropy_floor < 1 or self.grad_spike <= 1:
            raise ValueError(
                f"need 0 < health.entropy_floor < 1 and health.grad_spike > 1, got "
                f"{self.entropy_floor}, {self.grad_spike}"
            )
        for name in ("max_truncation", "dead_batch", "solved_accuracy"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"health.{name} must be in (0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class HealthWarning:
    signal: str
    """The signal's name: health/<signal> is its flag."""
    message: str
    """One line: what crossed which threshold, and the settings that mitigate it."""


def _recent(history: History, key: str, n: int) -> list[float] | None:
    """`key` of the last `n` steps, or None when there are fewer or one lacks it."""
    if len(history) < n or any(key not in m for m in history[-n:]):
        return None
    return [float(m[key]) for m in history[-n:]]


def _solving(history: History, cfg: HealthConfig) -> bool:
    """The training accuracy >= solved_accuracy for the last `patience` steps."""
    accuracy = _recent(history, "train/accuracy", cfg.patience)
    return accuracy is not None and min(accuracy) >= cfg.solved_accuracy


def group_collapse(history: History, cfg: HealthConfig, group_size: int | None) -> str | None:
    """Distinct completions per group (train/distinct_completions x G) <= collapse_distinct,
    unless the policy is solving its problems (`solved_accuracy`)."""
    values = _recent(history, "train/distinct_completions", cfg.patience)
    if group_size is None or values is None or _solving(history, cfg):
        return None
    per_group = [v * group_size for v in values]
    if max(per_group) > cfg.collapse_distinct:
        return None
    return (
        f"group collapse: {per_group[-1]:.2f} distinct completions per group of {group_size} "
        f"for {cfg.patience} steps (health.collapse_distinct {cfg.collapse_distinct}): raise "
        f"rollout.temperature or grpo.eps_high, or lower grpo.learning_rate"
    )


def entropy_collapse(history: History, cfg: HealthConfig, early: float | None) -> str | None:
    """Token entropy < entropy_floor x `early` (its mean over the first `window` steps), unless
    the policy is solving its problems (`solved_accuracy`)."""
    values = _recent(history, "train/entropy", cfg.patience)
    if early is None or values is None or max(values) >= cfg.entropy_floor * early:
        return None
    if _solving(history, cfg):  # a policy that solves its problems is sure of its answers
        return None
    return (
        f"entropy collapse: token entropy {values[-1]:.3g}, {values[-1] / early:.0%} of its "
        f"early {early:.3g} (health.entropy_floor {cfg.entropy_floor}): raise grpo.eps_high "
        f"(clip-higher) or lower grpo.learning_rate"
    )


def reward_hacking(history: History, cfg: HealthConfig) -> str | None:
    """A shaping reward's window mean up >= hacking_rise while accuracy's is up <= hacking_flat."""
    w = cfg.window
    accuracy = _recent(history, "train/accuracy", 2 * w)
    if accuracy is None:
        return None
    gain = np.mean(accuracy[w:]) - np.mean(accuracy[:w])
    if gain > cfg.hacking_flat:
        return None
    for name in cfg.shaping_rewards:
        values = _recent(history, f"train/reward/{name}", 2 * w)
        if values is None:
            continue
        rise = np.mean(values[w:]) - np.mean(values[:w])
        if rise >= cfg.hacking_rise:
            return (
                f"reward hacking: the {name} reward rose {rise:+.2f} over the last {w} steps "
                f"while accuracy moved {gain:+.2f} (health.hacking_rise {cfg.hacking_rise}): "
                f"lower env.rewards.{name}, or check that correctness can be earned"
            )
    return None


def tool_error_spike(history: History, cfg: HealthConfig) -> str | None:
    """The step's tool-error rate >= tool_error_spike above the mean of the window before."""
    if "train/tool_calls" in history[-1] and not history[-1]["train/tool_calls"]:
        return None  # no call, no error rate
    rates = _recent(history, "train/tool_error_rate", cfg.window + 1)
    if rates is None:
        return None
    before = float(np.mean(rates[:-1]))
    if rates[-1] - before < cfg.tool_error_spike:
        return None
    return (
        f"tool-error spike: {rates[-1]:.0%} of tool calls failed, against {before:.0%} over the "
        f"{cfg.window} steps before (health.tool_error_spike {cfg.tool_error_spike}): read the "
        f"step's transcripts; env.tool_timeout_s if they time out"
    )


def high_truncation(history: History, cfg: HealthConfig) -> str | None:
    """Episodes cut by the turn limit or the token budget >= max_truncation of the batch."""
    turns = _recent(history, "train/truncated_turns", cfg.patience)
    context = _recent(history, "train/truncated_context", cfg.patience)
    if turns is None or context is None:
        return None
    rates = [a + b for a, b in zip(turns, context)]
    if min(rates) < cfg.max_truncation:
        return None
    return (
        f"high truncation: {rates[-1]:.0%} of episodes cut by a budget ({turns[-1]:.0%} turns, "
        f"{context[-1]:.0%} tokens) for {cfg.patience} steps (health.max_truncation "
        f"{cfg.max_truncation}): raise rollout.max_total_tokens or env.max_turns, or set "
        f"rollout.mask_truncated or rollout.overlong_buffer"
    )


def dead_batch(history: History, cfg: HealthConfig) -> str | None:
    """The trained batch's zero-variance groups >= dead_batch of its groups."""
    values = _recent(history, "train/zero_variance_groups", cfg.patience)
    if values is None or min(values) < cfg.dead_batch:
        return None
    last = history[-1]
    refills = f" after {last['train/refills']:.0f} refills" if "train/refills" in last else ""
    solved, failed = last.get("train/solved_groups"), last.get("train/failed_groups")
    if solved is not None and failed is not None:
        cause = f" ({solved:.0%} of the groups all solved, {failed:.0%} all failed)"
    elif "train/accuracy" in last:
        cause = f" (accuracy {last['train/accuracy']:.0%})"
    else:
        cause = ""
    return (
        f"dead batch: {values[-1]:.0%} of the groups{refills} have no reward variance, so no "
        f"gradient{cause}, for {cfg.patience} steps (health.dead_batch {cfg.dead_batch}): turn "
        f"on dynamic_sampling or raise max_refills, or change the problems' difficulty"
    )


def sampler_gap(history: History, cfg: HealthConfig) -> str | None:
    """Mean |log p_sampler - log p_learner| per sampled token > max_sampler_gap."""
    values = _recent(history, "train/sampler_learner_gap", cfg.patience)
    if values is None or min(values) <= cfg.max_sampler_gap:
        return None
    return (
        f"sampler/learner gap: {values[-1]:.3f} mean |log-prob difference| per sampled token "
        f"for {cfg.patience} steps (health.max_sampler_gap {cfg.max_sampler_gap}): check the "
        f"sampler's dtype and adapter sync; grpo.tis_cap weights the difference"
    )


def grad_spike(history: History, cfg: HealthConfig) -> str | None:
    """The step's gradient norm >= grad_spike x the median of the window before, and above
    grad_spike_floor (a non-finite norm is a skipped update, which the loop reports itself)."""
    norms = _recent(history, "train/grad_norm", cfg.window + 1)
    if norms is None or not np.isfinite(norms).all():
        return None
    before = float(np.median(norms[:-1]))
    if not before > 0 or norms[-1] < cfg.grad_spike * before or norms[-1] <= cfg.grad_spike_floor:
        return None
    return (
        f"gradient-norm spike: {norms[-1]:.3g}, {norms[-1] / before:.1f}x the median "
        f"{before:.3g} of the {cfg.window} steps before (health.grad_spike {cfg.grad_spike}; "
        f"grpo.max_grad_norm clips the update): lower grpo.learning_rate, or set "
        f"rollout.mask_void_turns if train/void_episodes rose"
    )


SIGNALS = (
    "group_collapse",
    "entropy_collapse",
    "reward_hacking",
    "tool_error_spike",
    "high_truncation",
    "dead_batch",
    "sampler_gap",
    "grad_spike",
)
"""Every signal's name, in the order the monitor checks them."""


class HealthMonitor:
    """The signals of SIGNALS over the steps it observes (module docstring). `group_size`: the
    rollouts' episodes per problem (None: no group-collapse signal)."""

    def __init__(self, cfg: HealthConfig | None = None, group_size: int | None = None):
        self.cfg = cfg or HealthConfig()
        self.group_size = group_size
        self.history: deque[dict] = deque(maxlen=2 * self.cfg.window + self.cfg.patience)
        self._early: list[float] = []

    @property
    def early_entropy(self) -> float | None:
        """The mean token entropy of the first `window` steps (None until there are that many)."""
        if len(self._early) < self.cfg.window:
            return None
        return float(np.mean(self._early))

    def observe(self, step: int, metrics: Mapping) -> tuple[dict[str, float], list[HealthWarning]]:
        """Add step `step`'s metrics; its flags ({"health/<signal>": 1.0 when raised, else 0.0,
        for every signal}) and the warnings raised. A skipped update's step is observed too."""
        if not self.cfg.enabled:
            return {}, []
        entry = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self.history.append(entry)
        history = list(self.history)
        checks: dict[str, Callable[[], str | None]] = {
            "group_collapse": lambda: group_collapse(history, self.cfg, self.group_size),
            "entropy_collapse": lambda: entropy_collapse(history, self.cfg, self.early_entropy),
            "reward_hacking": lambda: reward_hacking(history, self.cfg),
            "tool_error_spike": lambda: tool_error_spike(history, self.cfg),
            "high_truncation": lambda: high_truncation(history, self.cfg),
            "dead_batch": lambda: dead_batch(history, self.cfg),
            "sampler_gap": lambda: sampler_gap(history, self.cfg),
            "grad_spike": lambda: grad_spike(history, self.cfg),
        }
        warnings = []
        for name in SIGNALS:
            message = checks[name]()
            if message is not None:
                warnings.append(HealthWarning(name, message))
        if len(self._early) < self.cfg.window and "train/entropy" in entry:
            self._early.append(entry["train/entropy"])
        raised = {w.signal for w in warnings}
        return {f"health/{name}": float(name in raised) for name in SIGNALS}, warnings
