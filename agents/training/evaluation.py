"""Held-out evaluation: pass@k over a set of problems, with answer and tool statistics.

metrics, transcripts = evaluate(rollouts, range(30), ks=(1, 8), seed=0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from toolgrpo.agents.batch import episode_metrics
from toolgrpo.agents.rollout import Rollouts


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def evaluate(
    rollouts: Rollouts,
    indices: Sequence[int],
    ks: Sequence[int] = (1,),
    seed: int = 0,
    chunk: int = 64,
    adapter_version: int | None = None,
) -> tuple[dict, list[str]]:
    """pass@k over `indices` with rollouts.cfg.group_size samples a problem, plus answer and tool
    statistics; returns (metrics, a few transcripts). Problems are played `chunk` episodes at a
    time."""
    n = rollouts.cfg.group_size
    per_chunk = max(1, chunk // n)
    indices = list(indices)
    correct, episodes, transcripts = [], [], []
    for start in range(0, len(indices), per_chunk):
        batch = rollouts.collect(
            indices[start : start + per_chunk], seed=seed + start, adapter_version=adapter_version
        )
        for g in range(len(indices[start : start + per_chunk])):
            correct.append(sum(e.correct for e in batch.episodes if e.group == g))
        episodes += batch.episodes
        transcripts += batch.transcripts[:2]
    metrics = {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for c in correct])) for k in ks}
    summary = episode_metrics(episodes)
    metrics.update(
        {
            k: summary[k]
            for k in (
                "reward",
                "tool_use_rate",
                "tool_error_rate",
                "turns",
                "answer_rate",
                "truncated_context",
                "sampled_tokens",
            )
        }
    )
    metrics.update(
        {k: v for k, v in summary.items() if k.startswith(("source/", "tool/", "selection_"))}
    )
    metrics["problems"], metrics["samples_per_problem"] = len(indices), n
    return metrics, transcripts
