"""The offline proof that ToolGRPO teaches tool use: CPU only, nothing downloaded, a few minutes.

    uv run python experiments/arith_grpo.py --out runs/arith        # the full demo
    uv run python experiments/arith_grpo.py --quick --out /tmp/a     # the shortened test version

1. A small byte-level BPE tokenizer with Qwen's chat template is trained on the demonstrations,
   and a tiny Qwen2 (random init) is built.
2. Supervised warm start on ToolMath-Arith-v0 demonstrations, in two phases:
   a. the skill: demonstrations that all use the tool (```python print(a * b)```, read the output,
      \\boxed{it}), until the model writes both copies of a new problem's demonstration (the
      factors into the code, the tool's output into the answer) each with mean probability
      `copy_target` (teacher-forced, every `check_every` steps, on a problem stream of its
      own), within `tool_steps_budget` steps;
   b. the habit: `mix_steps` steps at `mix_learning_rate_scale` of the learning rate on
      demonstrations of which only `tool_fraction` use the tool, the rest guess a number. The
      warm-started model can use the tool but does so only part of the time, so it is often
      wrong.
   Copying is the one hard part for the tiny model: the factors' copy is learned in a sharp
   transition after a plateau whose length depends on the seed, so phase a ends on the measured
   criterion, not after a fixed count (docs/results.md has the measurements behind this design).
3. GRPO with LoRA on ToolMath-Arith-v0 through the JAX sampler and the sandbox: the same library
   code (toolgrpo.agents.rollout, toolgrpo.learners.train, toolgrpo.agents.training) as the main job.
Held-out accuracy (pass@1 at temperature 1) and the tool-use rate are measured before and after,
on problems the model never trained on. Writes DIR/summary.json, DIR/metrics.jsonl and
DIR/arith_grpo.png.

How this departs from textbook GRPO (DeepSeekMath): no KL penalty (beta 0), clip-higher
(eps_high 0.28), one optimisation pass a batch, rewards from the environment's components
(correct 1.0, boxed 0.1, tool ran 0.1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tyro
from arith_demonstrations import TokenRows, demonstration_probabilities, demonstrations, token_rows
from tiny_demo import grpo_phase, tiny_qwen2


@dataclass(frozen=True)
class Config:
    """Offline tool-learning demo settings (defaults: the full run quoted in README)."""

    out: str = "runs/arith"
    """Run directory: summary.json, metrics.jsonl, the plot, transcripts."""
    overwrite: bool = False
    """Replace a run already in --out (a new run into a non-empty --out stops otherwise)."""
    quick: bool = False
    """The shortened version the test runs (fewer steps and evaluation problems)."""
    seed: int = 0
    """Seed of the data, the model init and the sampling."""
    difficulty: int = 1
    """ToolMath-Arith difficulty (1-10)."""
    kinds: tuple[str, ...] = ("product",)
    """Problem kinds (toolgrpo.envs.problems.ArithProblems.KINDS). Products of two 3-digit numbers: a
    guess is almost never right, and the code only has to copy the two factors, which a tiny
    model learns within the budget (modpow/factorial_digits need a longer warm start)."""
    tool_fraction: float = 0.5
    """Share of phase b's demonstrations that use the tool (the rest guess)."""
    vocab_size: int = 512
    """BPE vocabulary of the tokenizer trained here."""
    hidden_size: int = 128
    """Width of the tiny Qwen2."""
    layers: int = 2
    """Decoder layers."""
    head_dim: int = 16
    """Width of an attention head (hidden_size // head_dim heads, half as many key/value heads)."""
    sft_examples: int = 4000
    """Warm-start problems (each has a tool demonstration and a guess)."""
    tool_steps_budget: int = 1000
    """Most steps of warm-start phase a (tool demonstrations only)."""
    copy_target: float = 0.9
    """Phase a ends when the model writes each of a tool demonstration's `copy_parts` with
    this mean probability on the check problems."""
    copy_parts: tuple[Literal["code", "answer"], ...] = ("code", "answer")
    """The parts of a tool demonstration that phase a's criterion measures: "code" (the
    factors copied into the code) and "answer" (the tool's output copied into \\boxed{}).
    The answer's copy is learned after the code's: a phase a that ends on the code alone
    leaves it at about 0.8, and GRPO's held-out accuracy ends near 0.74 on every seed."""
    check_every: int = 25
    """Steps between two checks of phase a."""
    check_problems: int = 128
    """Problems of the check (a problem stream of its own, never trained on)."""
    mix_steps: int = 100
    """Steps of warm-start phase b (demonstrations of which tool_fraction use the tool)."""
    mix_learning_rate_scale: float = 0.3
    """Phase b's learning rate as a fraction of sft_learning_rate (at the full rate the copy
    learned in phase a is partly unlearned)."""
    sft_batch: int = 32
    """Warm-start batch size."""
    sft_learning_rate: float = 3e-3
    """Warm-start peak learning rate (AdamW on every parameter)."""
    grpo_steps: int = 20
    """GRPO steps."""
    problems_per_step: int = 16
    """Problems a GRPO step (each played group_size times)."""
    group_size: int = 8
    """Episodes per problem."""
    learning_rate: float = 1e-3
    """GRPO learning rate (AdamW on the LoRA parameters). 2e-3 learns faster but is unstable:
    with one random stream it collapsed (the answer format lost) after 7 steps."""
    lora_rank: int = 16
    """LoRA rank."""
    temperature: float = 1.0
    """Sampling temperature (training and evaluation)."""
    max_turn_tokens: int = 48
    """Generation budget of a turn."""
    max_total_tokens: int = 192
    """Budget of a whole episode (a correct one needs about 110 tokens); longer episodes end
    as truncated with reward 0, which keeps the learner's batches short."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: refill groups whose rewards are all equal (GRPOLoop), at most
    max_refills collections more a step (docs/training_issues.md measures it on this demo)."""
    max_refills: int = 2
    """Collections more a step that dynamic sampling may make."""
    mask_truncated: Literal["none", "context", "all"] = "none"
    """Truncated episodes dropped from the loss (RolloutConfig.mask_truncated, DAPO)."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment zone, in tokens before max_total_tokens (0: off)."""
    eps_high: float = 0.28
    """The ratio's upper clip, 1 + eps_high (clip-higher, DAPO; 0.2 is PPO's symmetric clip)."""
    eval_problems: int = 128
    """Held-out problems for the accuracy figures."""
    eval_samples: int = 2
    """Samples per held-out problem (pass@1 is their mean)."""
    wandb: Literal["online", "offline", "off"] = "off"
    """Weights & Biases: "online", "offline" or "off"."""

    def __post_init__(self):
        if not 0 <= self.tool_fraction <= 1:
            raise ValueError(f"tool_fraction must be in [0, 1], got {self.tool_fraction}")
        if not 0 < self.copy_target < 1:
            raise ValueError(f"copy_target must be in (0, 1), got {self.copy_target}")
        if self.hidden_size % self.head_dim:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of head_dim {self.head_dim}"
            )
        if (
            min(self.check_every, self.check_problems) < 1
            or self.tool_steps_budget < self.check_every
        ):
            raise ValueError(
                "check_every and check_problems must be >= 1 and tool_steps_budget "
                f">= check_every, got {self.check_every}, {self.check_problems}, "
                f"{self.tool_steps_budget}"
            )

    def shortened(self) -> Config:
        if not self.quick:
            return self
        return dataclasses.replace(self, grpo_steps=12, eval_problems=48)


SYSTEM_PROMPT = "Run python in a ```python block if you need to; answer in \\boxed{}."
"""Short instructions: a tiny model's context is better spent on the problem."""


def warm_start(
    model, cfg: Config, tool_rows: TokenRows, mixed_rows: TokenRows, check_rows: TokenRows, log
) -> dict:
    """The two phases of the supervised warm start (module docstring), in place; returns what
    they measured."""
    from tqdm import tqdm

    from toolgrpo.learners.sft import SFTStep

    sft = SFTStep(model, learning_rate=cfg.sft_learning_rate, warmup_steps=30)
    order = np.random.default_rng(cfg.seed)
    first_step = -(cfg.tool_steps_budget + cfg.mix_steps + 1)  # phase b logs -mix_steps..-1
    warm: dict = {"checks": []}
    bar = tqdm(
        range(1, cfg.tool_steps_budget + 1),
        desc="warm start a (tool demonstrations)",
        dynamic_ncols=True,
    )
    for step in bar:
        loss = sft(tool_rows.sample(order, cfg.sft_batch))
        if step % 10 == 0:
            log.log(first_step + step, {"sft/loss": loss})
        if step % cfg.check_every == 0:
            probabilities = demonstration_probabilities(model, check_rows)
            copy = min(probabilities[part] for part in cfg.copy_parts)
            warm["checks"].append((step, copy))
            log.log(first_step + step, {"sft/copy_probability": copy})
            bar.set_postfix(loss=f"{loss:.3f}", copy=f"{copy:.3f}")
            if copy >= cfg.copy_target:
                break
    bar.close()
    warm["tool_steps"], warm["copy_probability"] = step, warm["checks"][-1][1]
    if warm["copy_probability"] < cfg.copy_target:
        print(
            f"warning: the warm start copies the factors with probability "
            f"{warm['copy_probability']:.3f} after {step} steps, short of copy_target="
            f"{cfg.copy_target}; GRPO starts anyway (raise --tool-steps-budget)",
            file=sys.stderr,
            flush=True,
        )
    warm["after_tool_phase"] = demonstration_probabilities(model, check_rows)
    sft.scale_learning_rate(cfg.mix_learning_rate_scale)
    for step in tqdm(
        range(cfg.mix_steps), desc="warm start b (mixed demonstrations)", dynamic_ncols=True
    ):
        loss = sft(mixed_rows.sample(order, cfg.sft_batch))
        if step % 10 == 0:
            log.log(step - cfg.mix_steps, {"sft/loss": loss})
    warm["after_mix_phase"] = demonstration_probabilities(model, check_rows)
    a, b = warm["after_tool_phase"], warm["after_mix_phase"]
    print(
        f"warm start: {warm['tool_steps']} + {cfg.mix_steps} steps; teacher-forced on the "
        f"check problems: code {a['code']:.3f} -> {b['code']:.3f}, answer "
        f"{a['answer']:.3f} -> {b['answer']:.3f}, whole demonstration "
        f"{a['demonstration']:.3f} -> {b['demonstration']:.3f}, tool first "
        f"{a['tool']:.3f} -> {b['tool']:.3f}",
        flush=True,
    )
    return warm


def main(cfg: Config) -> dict:
    import gymnasium as gym

    import toolgrpo.envs  # noqa: F401 - registers the environments
    from toolgrpo.agents.training import (
        RunLog,
        run_environment,
    )
    from toolgrpo.agents.training.cli import configure_logging, one_line_errors
    from toolgrpo.agents.training.rundir import prepare_run_directory
    from toolgrpo.envs.problems import ArithProblems
    from toolgrpo.learners.tokenizer import train_chat_tokenizer

    configure_logging()
    cfg = cfg.shortened()
    t_start = time.perf_counter()
    with one_line_errors():
        prepare_run_directory(cfg.out, cfg, resume=False, overwrite=cfg.overwrite)
    log = RunLog(cfg.out, cfg, wandb_mode=cfg.wandb, plot_every=5, plot_name="arith_grpo.png")
    train_problems = ArithProblems(cfg.difficulty, seed=cfg.seed + 1, kinds=cfg.kinds)
    heldout = ArithProblems(cfg.difficulty, seed=cfg.seed + 2, kinds=cfg.kinds)
    check_problems = ArithProblems(cfg.difficulty, seed=cfg.seed + 3, kinds=cfg.kinds)
    make_train_env = lambda: gym.make(
        "ToolMath-Arith-v0", problems=train_problems, system_prompt=SYSTEM_PROMPT
    )
    make_eval_env = lambda: gym.make(
        "ToolMath-Arith-v0", problems=heldout, system_prompt=SYSTEM_PROMPT
    )
    make_check_env = lambda: gym.make(
        "ToolMath-Arith-v0", problems=check_problems, system_prompt=SYSTEM_PROMPT
    )

    # 1. demonstrations rendered by the environment and the chat template; the tokenizer
    rng = random.Random(cfg.seed)
    tool_demos, guess_demos = demonstrations(
        make_train_env, train_problems, range(cfg.sft_examples), rng
    )
    check_demos, _ = demonstrations(make_check_env, check_problems, range(cfg.check_problems), rng)
    corpus = [SYSTEM_PROMPT] * 10 + [
        m[1]["content"] + "".join(t for t, _ in segs) for m, segs in tool_demos + guess_demos
    ]
    tokenizer = train_chat_tokenizer(corpus, vocab_size=cfg.vocab_size)
    tool_rows = token_rows(tokenizer, tool_demos)
    mixed_rows = token_rows(
        tokenizer,
        [t if rng.random() < cfg.tool_fraction else g for t, g in zip(tool_demos, guess_demos)],
    )
    check_rows = token_rows(tokenizer, check_demos)

    # 2. a tiny Qwen2 and the two-phase supervised warm start
    model = tiny_qwen2(tokenizer, cfg.hidden_size, cfg.layers, cfg.head_dim, cfg.seed)
    warm = warm_start(model, cfg, tool_rows, mixed_rows, check_rows, log)
    t_sft = time.perf_counter() - t_start

    # 3. GRPO with LoRA through the JAX sampler and the sandbox
    before, after = grpo_phase(
        model,
        tokenizer,
        cfg,
        make_train_env,
        make_eval_env,
        log,
        first_problem=cfg.sft_examples,  # never seen in the warm start
        on_warm_start=lambda m: print(
            f"warm start: accuracy {m['eval/pass@1']:.3f}, tool use {m['eval/tool_use_rate']:.3f}",
            flush=True,
        ),
        rollout={"mask_truncated": cfg.mask_truncated, "overlong_buffer": cfg.overlong_buffer},
        grpo={"eps_high": cfg.eps_high},
        loop={"dynamic_sampling": cfg.dynamic_sampling, "max_refills": cfg.max_refills},
    )
    log.close()
    summary = {
        "warm_start_accuracy": before["eval/pass@1"],
        "final_accuracy": after["eval/pass@1"],
        "warm_start_tool_use_rate": before["eval/tool_use_rate"],
        "final_tool_use_rate": after["eval/tool_use_rate"],
        "warm_start_reward": before["eval/reward"],
        "final_reward": after["eval/reward"],
        "accuracy_gain_points": 100 * (after["eval/pass@1"] - before["eval/pass@1"]),
        "wall_s": time.perf_counter() - t_start,
        "sft_s": t_sft,
        "warm_start": warm,
        "eval_problems": cfg.eval_problems,
        "eval_samples": cfg.eval_samples,
        "grpo_steps": cfg.grpo_steps,
        "quick": cfg.quick,
        "seed": cfg.seed,
        "environment": run_environment(),
    }
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(tyro.cli(Config))
