"""What the rollout does to finished episodes before the learner sees them: which rows keep their
loss (void turns, truncation, crashes) and the soft overlong penalty. Pure functions; the
rollout (toolgrpo.agents.rollout) applies them as RolloutConfig says.

Sources:
* Void turns: Xue et al. 2025, SimpleTIR, arXiv 2509.02479: a turn that yields neither a
  complete tool call nor a final answer (typically a generation cut off, or one that stops
  early) marks an episode whose low-probability tokens drive the gradient-norm explosions of
  multi-turn tool RL; SimpleTIR drops such episodes from the loss.
* Overlong episodes: Yu et al. 2025, DAPO, arXiv 2503.14476, section 3.4: "overlong filtering"
  masks the loss of truncated samples (a sound chain of reasoning cut by the budget is not
  punished for it), and "soft overlong punishment" is a length penalty over the last
  `buffer` tokens of the budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TRUNCATION_MASKS = ("none", "context", "all")
"""RolloutConfig.mask_truncated: none; "context" (episodes cut by max_total_tokens, DAPO's
overlong samples); "all" (also those the environment truncated at its turn or length limit)."""


def void_turn(cut: bool, parse_failure: bool, final_without_answer: bool) -> bool:
    """Whether a turn is void (SimpleTIR): it yields neither a complete tool call nor a final
    answer. That is: its generation was `cut` by a token budget (the turn's or the context's:
    whatever it began, a call or an answer, is incomplete), or the environment could not parse
    its tool call (`parse_failure`), or it ended the episode as an answer with no \\boxed{}
    (`final_without_answer`)."""
    return bool(cut or parse_failure or final_without_answer)


def keeps_loss(
    truncated: Sequence[str | None],
    void_turns: Sequence[int],
    mask_void_turns: bool = False,
    mask_truncated: str = "none",
) -> np.ndarray:
    """bool [B]: the episodes whose sampled tokens stay in the loss. An episode loses its loss
    when it crashed (the sandbox died: not the model's doing), when `mask_void_turns` and it
    has a void turn (SimpleTIR), or when it was truncated as `mask_truncated` says (DAPO's
    overlong filtering: "context" for max_total_tokens, "all" for any truncation). Its reward
    still counts in its group's baseline: only its own gradient is dropped."""
    if mask_truncated not in TRUNCATION_MASKS:
        raise ValueError(
            f"mask_truncated must be one of {TRUNCATION_MASKS}, got {mask_truncated!r}"
        )
    truncated = list(truncated)
    masked = {"none": set(), "context": {"context"}, "all": {"context", "turns"}}[mask_truncated]
    dropped = {"crashed"} | masked
    keep = np.array([t not in dropped for t in truncated], bool)
    if mask_void_turns:
        keep &= np.asarray(void_turns, int).reshape(len(truncated)) == 0
    return keep


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), added to the reward, for an
    episode of `length` tokens under a budget of `max_length` with the last `buffer` tokens the
    punished zone (L_cache in the paper):

        R(L) = 0                                    if L <= max_length - buffer
               ((max_length - buffer) - L) / buffer  if max_length - buffer < L <= max_length
               -1                                    if L > max_length

    times `factor`. buffer 0: no penalty (0 everywhere)."""
    if buffer <= 0:
        return 0.0
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length > max_length:
        return -float(factor)
    return float(factor) * (start - length) / buffer
