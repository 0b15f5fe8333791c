"""The training-health monitor: each signal computed by hand on constructed histories, and
runs of the real loop (a tiny model's GRPO updates on episodes a scripted sampler writes) that
collapse or hack the reward raising their warnings through fit."""

import itertools
import json
import logging
import math

import pytest
from scripted import ScriptedSampler
from tiny import tiny_model

import toolgrpo.envs  # noqa: F401 - registers the environments
from toolgrpo.agents.rollout import RolloutConfig, Rollouts
from toolgrpo.agents.training import (
    GRPOLoop,
    HealthConfig,
    HealthMonitor,
    ProblemOrder,
    RunLog,
    fit,
)
from toolgrpo.agents.training import health as h
from toolgrpo.envs.problems import ArithProblems
from toolgrpo.envs.toolmath import ToolMathEnv
from toolgrpo.learners.train import GRPOConfig, init_state

CFG = HealthConfig(window=3, patience=2)


def steps(**series) -> list[dict]:
    """A history: step i has series[key][i] as f"train/{key}"."""
    n = len(next(iter(series.values())))
    return [{f"train/{k}": float(v[i]) for k, v in series.items()} for i in range(n)]


def said(message: str | None) -> str:
    """A signal's message, which must have been raised."""
    assert message is not None
    return message


def test_group_collapse_is_at_most_collapse_distinct_completions_per_group_for_patience_steps():
    # G = 8: distinct_completions 1/8 is a group of copies; 1.5/8 is the threshold itself
    assert "1.00 distinct completions per group of 8" in said(
        h.group_collapse(steps(distinct_completions=[1, 1 / 8, 1 / 8]), CFG, 8)
    )
    assert h.group_collapse(steps(distinct_completions=[1 / 8, 1.5 / 8]), CFG, 8) is not None
    assert h.group_collapse(steps(distinct_completions=[1 / 8, 2 / 8]), CFG, 8) is None
    assert h.group_collapse(steps(distinct_completions=[1, 1 / 8]), CFG, 8) is None  # 1 step
    assert h.group_collapse(steps(distinct_completions=[1 / 8] * 3), CFG, None) is None
    # a policy that solves its problems converges on copies of a solution: no warning
    copies = [1 / 8, 1.5 / 8]
    solved = steps(distinct_completions=copies, accuracy=[0.9, 0.97])
    assert h.group_collapse(solved, CFG, 8) is None
    half = steps(distinct_completions=copies, accuracy=[0.89, 0.97])
    assert h.group_collapse(half, CFG, 8) is not None


def test_entropy_collapse_is_entropy_below_entropy_floor_of_its_early_mean():
    # floor 0.1 of an early mean of 2.0: 0.2
    message = h.entropy_collapse(steps(entropy=[2.0, 0.19, 0.1]), CFG, early=2.0)
    assert message is not None and "0.1, 5% of its early 2" in message
    assert h.entropy_collapse(steps(entropy=[0.2, 0.1]), CFG, early=2.0) is None
    assert h.entropy_collapse(steps(entropy=[0.1, 0.1]), CFG, early=None) is None
    solving = steps(entropy=[0.1, 0.1], accuracy=[0.95, 0.92])
    assert h.entropy_collapse(solving, CFG, early=2.0) is None


def test_reward_hacking_is_a_shaping_reward_rising_a_window_while_accuracy_does_not():
    # window 3: format's mean 0.2 -> 0.5 (+0.3 >= 0.2), accuracy 0.1 -> 0.1
    hacked = steps(accuracy=[0.1] * 6, **{"reward/format": [0.2] * 3 + [0.5] * 3})
    assert "the format reward rose +0.30" in said(h.reward_hacking(hacked, CFG))
    # accuracy up 0.1 -> 0.13 (+0.03 > hacking_flat 0.02): it is learning, not hacking
    learning = steps(accuracy=[0.1] * 3 + [0.13] * 3, **{"reward/format": [0.2] * 3 + [0.5] * 3})
    assert h.reward_hacking(learning, CFG) is None
    small = steps(accuracy=[0.1] * 6, **{"reward/tool_use": [0.2] * 3 + [0.39] * 3})
    assert h.reward_hacking(small, CFG) is None  # +0.19
    # correctness itself is not a shaping reward; five steps are short of two windows
    assert (
        h.reward_hacking(
            steps(accuracy=[0.1] * 6, **{"reward/correctness": [0] * 3 + [1] * 3}), CFG
        )
        is None
    )
    assert h.reward_hacking(hacked[1:], CFG) is None


def test_a_tool_error_spike_is_the_rate_up_tool_error_spike_from_the_window_before():
    # the window before: 0.1, 0.2, 0.0 (mean 0.1); 0.36 is +0.26, 0.34 +0.24
    assert "36% of tool calls failed, against 10%" in said(
        h.tool_error_spike(steps(tool_error_rate=[0.1, 0.2, 0.0, 0.36], tool_calls=[1] * 4), CFG)
    )
    assert h.tool_error_spike(steps(tool_error_rate=[0.1, 0.2, 0.0, 0.34]), CFG) is None
    assert h.tool_error_spike(steps(tool_error_rate=[0.2, 0.0, 0.9]), CFG) is None  # short
    # a step without tool calls has no error rate to spike
    assert (
        h.tool_error_spike(steps(tool_error_rate=[0, 0, 0, 1], tool_calls=[1, 1, 1, 0]), CFG)
        is None
    )


def test_high_truncation_counts_turn_and_token_budget_cuts():
    cut = steps(truncated_turns=[0.1, 0.2], truncated_context=[0.2, 0.15])  # 0.3, 0.35
    assert "35% of episodes cut by a budget (20% turns, 15% tokens)" in said(
        h.high_truncation(cut, CFG)
    )
    fine = steps(truncated_turns=[0.1, 0.2], truncated_context=[0.19, 0.2])  # 0.29, 0.4
    assert h.high_truncation(fine, CFG) is None


def test_a_dead_batch_says_how_many_groups_were_solved_and_how_many_failed():
    dead = steps(
        zero_variance_groups=[0.875, 1.0],
        solved_groups=[0.5, 0.75],
        failed_groups=[0.25, 0.25],
        refills=[2, 2],
    )
    message = said(h.dead_batch(dead, CFG))
    assert "100% of the groups after 2 refills" in message
    assert "75% of the groups all solved, 25% all failed" in message
    # without the group outcomes (an older run's log), the accuracy
    message = said(h.dead_batch(steps(zero_variance_groups=[0.9, 0.9], accuracy=[0.2, 0.1]), CFG))
    assert "(accuracy 10%)" in message
    # 0.85 for two steps in a row: one step under it (or a healthy 6 of 8 groups) is quiet
    assert h.dead_batch(steps(zero_variance_groups=[0.84, 1.0]), CFG) is None
    assert h.dead_batch(steps(zero_variance_groups=[0.75, 0.75]), CFG) is None


def test_sampler_gap_and_gradient_norm_spikes():
    assert h.sampler_gap(steps(sampler_learner_gap=[0.11, 0.2]), CFG) is not None
    assert h.sampler_gap(steps(sampler_learner_gap=[0.1, 0.2]), CFG) is None
    # the median of the window before is 1.0; grad_spike 5
    message = h.grad_spike(steps(grad_norm=[1.0, 3.0, 0.5, 5.0]), CFG)
    assert message is not None and "5.0x the median 1" in message
    # 9.4x the median, but 0.68 is under grad_spike_floor 1.0: an update max_grad_norm keeps
    small = steps(grad_norm=[0.07, 0.08, 0.07, 0.68])
    assert h.grad_spike(small, CFG) is None
    assert h.grad_spike(small, HealthConfig(window=3, grad_spike_floor=0.5)) is not None
    assert h.grad_spike(steps(grad_norm=[1.0, 3.0, 0.5, 4.99]), CFG) is None
    assert h.grad_spike(steps(grad_norm=[1.0, 1.0, 1.0, math.nan]), CFG) is None  # skipped
    assert h.grad_spike(steps(grad_norm=[0.0, 0.0, 0.0, 1.0]), CFG) is None  # no scale yet


def test_the_monitor_flags_every_signal_and_learns_the_early_entropy():
    monitor = HealthMonitor(CFG, group_size=4)
    healthy = {"train/entropy": 2.0, "train/distinct_completions": 1.0, "train/grad_norm": 1.0}
    for step in range(1, 4):
        flags, warnings = monitor.observe(step, healthy | {"train/entropy": 1.0 + step})
        assert flags == {f"health/{name}": 0.0 for name in h.SIGNALS} and not warnings
    assert monitor.early_entropy == 3.0  # the mean of 2, 3, 4
    collapsed = {"train/entropy": 0.29, "train/distinct_completions": 0.25, "train/grad_norm": 1.0}
    assert not monitor.observe(4, collapsed)[1]  # patience 2
    flags, warnings = monitor.observe(5, collapsed | {"note": "not a number"})
    assert [w.signal for w in warnings] == ["group_collapse", "entropy_collapse"]
    assert flags["health/group_collapse"] == flags["health/entropy_collapse"] == 1.0
    assert sum(flags.values()) == 2
    off = HealthMonitor(HealthConfig(enabled=False), group_size=4)
    assert off.observe(1, collapsed) == ({}, [])


@pytest.mark.parametrize(
    "bad",
    [
        {"window": 0},
        {"patience": 0},
        {"entropy_floor": 1.0},
        {"grad_spike": 1.0},
        {"dead_batch": 0},
    ],
)
def test_bad_thresholds_are_refused(bad):
    with pytest.raises(ValueError, match="health"):
        HealthConfig(**bad)


def train_on_script(tmp_path, script_of, chat_tokenizer, steps: int):
    """`steps` real GRPO steps of a tiny model on ToolMath-Arith episodes that a scripted
    sampler writes (`script_of(sampler)` gives its script, which may read the adapter version:
    the step), through fit; its metrics.jsonl records."""
    chat_model = tiny_model(vocab_size=len(chat_tokenizer), max_position_embeddings=1024)
    sampler = ScriptedSampler(chat_tokenizer, lambda text, turn: script(text, turn))
    script = script_of(sampler)
    problems = ArithProblems(1, seed=0)
    cfg = GRPOConfig(learning_rate=1e-3, warmup_steps=0, total_steps=steps, micro_batch_size=None)
    rollouts = Rollouts(
        lambda: ToolMathEnv(problems=problems), sampler, chat_tokenizer, RolloutConfig(group_size=4)
    )
    with rollouts:
        loop = GRPOLoop(
            model=chat_model,
            state=init_state(chat_model, cfg),
            cfg=cfg,
            rollouts=rollouts,
            problems_per_step=2,
        )
        log = RunLog(str(tmp_path), {"test": True})
        monitor = HealthMonitor(HealthConfig(window=3, patience=2), group_size=4)
        fit(
            loop,
            ProblemOrder(None),
            log,
            start=0,
            steps=steps,
            seed=0,
            progress=False,
            health=monitor,
        )
    with open(tmp_path / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_a_run_of_copies_warns_of_group_collapse_and_a_dead_batch(tmp_path, chat_tokenizer, caplog):
    """Every episode of every group the same text: one distinct completion per group of 4, and
    every group without reward variance."""
    with caplog.at_level(logging.WARNING, logger="toolgrpo.agents"):
        records = train_on_script(
            tmp_path, lambda s: lambda text, turn: "\\boxed{7}<|im_end|>", chat_tokenizer, 3
        )
    assert [r["train/distinct_completions"] for r in records] == [0.25] * 3
    assert [r["health/group_collapse"] for r in records] == [0, 1, 1]  # patience 2
    assert [r["health/dead_batch"] for r in records] == [0, 1, 1]
    # a group of copies is all solved or all failed
    assert all(r["train/solved_groups"] + r["train/failed_groups"] == 1 for r in records)
    assert all(r["health/reward_hacking"] == 0 for r in records)
    lines = [r.getMessage() for r in caplog.records if r.name == "toolgrpo.agents.training.fit"]
    assert any(m.startswith("step 2: group collapse: 1.00 distinct completions") for m in lines)
    assert any(m.startswith("step 3: dead batch: 100% of the groups") for m in lines), lines


def test_a_run_that_learns_the_format_but_not_the_answer_warns_of_reward_hacking(
    tmp_path, chat_tokenizer, caplog
):
    """Steps 1-3 answer without \\boxed{}, steps 4-6 box a wrong answer: the format reward goes
    0 -> 1 (unweighted) while accuracy stays 0. The members of a group differ (no collapse)."""

    def script_of(sampler):
        prompts = itertools.count()  # a number of its own for every episode

        def script(text, turn):
            guess = f"{next(prompts)} is my guess"
            return (f"\\boxed{{{guess}}}" if sampler.adapter_version >= 3 else guess) + "<|im_end|>"

        return script

    with caplog.at_level(logging.WARNING, logger="toolgrpo.agents"):
        records = train_on_script(tmp_path, script_of, chat_tokenizer, 6)
    assert [r["train/reward/format"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert all(r["train/accuracy"] == 0 for r in records)
    assert [r["health/reward_hacking"] for r in records] == [0] * 5 + [1]
    assert not any(r["health/group_collapse"] for r in records)
    lines = [r.getMessage() for r in caplog.records if "reward hacking" in r.getMessage()]
    assert lines == [
        "step 6: reward hacking: the format reward rose +1.00 over the last 3 steps while "
        "accuracy moved +0.00 (health.hacking_rise 0.2): lower env.rewards.format, or check "
        "that correctness can be earned"
    ]
