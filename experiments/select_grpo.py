"""The offline proof that RL teaches tool *selection*: CPU only, nothing downloaded, minutes.

    uv run python experiments/select_grpo.py --out runs/select         # the full demo
    uv run python experiments/select_grpo.py --quick --out /tmp/s       # the shortened test version

Three kinds of problem (experiments/select_data.py), each solved by one choice of tools only:
products of 3-digit numbers (python), the secret code of a generated entity (search over a
corpus of their passages) and the sum of two entities' codes (search, then python), drawn from a
mixture of three sources on ToolUse-v0 (Qwen2.5's function-calling format, the real sandbox and a
real BM25 index).

1. A BPE tokenizer with Qwen's chat format and a tiny Qwen2 (random init) are built.
2. Supervised warm start on demonstrations whose **first tool is chosen at random** (half
   python, half search, whatever the problem): with the right tool the demonstration solves
   the problem, with the other it reads a useless output and guesses. It teaches how to use
   each tool and not which one a problem needs: the model's first tool is a coin toss. It ends
   when the model writes every kind's solution (after the choice) with mean probability
   `skill_target` (teacher-forced, every `check_every` steps, on problems of their own).
3. GRPO with LoRA on the mixture, rewarded for correct answers only as far as selection goes
   (RewardWeights' defaults: correct 1, boxed 0.1, a tool ran 0.1; no selection shaping):
   choosing the right tool is what wins a group's reward.
Held-out problems (entities never trained on) measure, before and after, each kind's accuracy
and the tool-selection accuracy (the first call used the tool the kind needs). Writes
DIR/summary.json, DIR/metrics.jsonl and DIR/select_grpo.png.
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
from select_data import (
    FIRST_TOOL,
    KINDS,
    Rows,
    World,
    demonstration,
    encode,
    random_tool_demonstrations,
)
from tiny_demo import grpo_phase, teacher_forced_logprobs, tiny_qwen2


@dataclass(frozen=True)
class Config:
    """Offline tool-selection demo settings (defaults: the full run quoted in README)."""

    out: str = "runs/select"
    """Run directory: summary.json, metrics.jsonl, the plot, transcripts, corpus.jsonl."""
    overwrite: bool = False
    """Replace a run already in --out (a new run into a non-empty --out stops otherwise)."""
    quick: bool = False
    """The shortened version the test runs (fewer GRPO steps and evaluation problems)."""
    seed: int = 0
    """Seed of the world, the data, the model init and the sampling."""
    entities: int = 3000
    """Entities in the world (passages in the corpus); half train, half held out."""
    search_k: int = 2
    """Passages a search returns (2: a sum's query finds both of its entities)."""
    vocab_size: int = 512
    """BPE vocabulary of the tokenizer trained here."""
    hidden_size: int = 128
    """Width of the tiny Qwen2."""
    layers: int = 2
    """Decoder layers."""
    head_dim: int = 16
    """Width of an attention head."""
    sft_examples: int = 6000
    """Warm-start problems (a third of each kind), each with a random first tool."""
    sft_steps_budget: int = 1500
    """Most warm-start steps."""
    skill_target: float = 0.85
    """The warm start ends when the model writes each kind's right-tool demonstration, after
    the tool's name, with at least this mean probability on the check problems."""
    check_every: int = 25
    """Steps between two checks of the warm start."""
    check_problems: int = 32
    """Check problems of each kind (a problem stream of their own, never trained on)."""
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
    """GRPO learning rate (AdamW on the LoRA parameters)."""
    lora_rank: int = 16
    """LoRA rank."""
    temperature: float = 1.0
    """Sampling temperature (training and evaluation)."""
    max_turns: int = 3
    """Turns of an episode (a sum needs three: search, python, answer)."""
    max_turn_tokens: int = 48
    """Generation budget of a turn."""
    max_total_tokens: int = 320
    """Budget of a whole episode."""
    eval_problems: int = 150
    """Held-out problems (about a third of each kind) for the accuracy figures."""
    eval_samples: int = 2
    """Samples per held-out problem."""
    wandb: Literal["online", "offline", "off"] = "off"
    """Weights & Biases: "online", "offline" or "off"."""

    def __post_init__(self):
        if not 0 < self.skill_target < 1:
            raise ValueError(f"skill_target must be in (0, 1), got {self.skill_target}")
        if self.hidden_size % self.head_dim:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of head_dim {self.head_dim}"
            )
        if min(self.check_every, self.check_problems, self.search_k) < 1 or (
            self.sft_steps_budget < self.check_every
        ):
            raise ValueError(
                "check_every, check_problems and search_k must be >= 1 and sft_steps_budget "
                f">= check_every, got {self.check_every}, {self.check_problems}, "
                f"{self.search_k}, {self.sft_steps_budget}"
            )

    def shortened(self) -> Config:
        if not self.quick:
            return self
        return dataclasses.replace(self, grpo_steps=10, eval_problems=60)


SYSTEM_PROMPT = "Use python or search."


def skill_probabilities(model, rows: Rows) -> dict:
    """Per kind, teacher-forced on right-tool demonstrations: "<kind>/skill", the mean
    probability of the model's text after the first tool's name; "<kind>/choice", the mean
    probability of that name (the right tool: about 0.5 is chance)."""
    logprobs = np.asarray(teacher_forced_logprobs()(model, rows.tokens))
    kinds = np.array(rows.kinds)
    out = {}
    for kind in KINDS:
        of = kinds == kind
        skill = (rows.part[of] == 1) & (np.cumsum(rows.part[of] == 2, 1) > 0)
        choice = rows.part[of] == 2
        out[f"{kind}/skill"] = float(np.mean(np.exp((logprobs[of] * skill).sum(1))))
        out[f"{kind}/choice"] = float(np.mean(np.exp((logprobs[of] * choice).sum(1))))
    return out


def warm_start(model, cfg: Config, train_rows: Rows, check_rows: Rows, log) -> dict:
    """The supervised warm start (module docstring), in place; returns what it measured."""
    from tqdm import tqdm

    from toolgrpo.learners.sft import SFTStep

    sft = SFTStep(model, learning_rate=cfg.sft_learning_rate, warmup_steps=30)
    order = np.random.default_rng(cfg.seed)
    first_step = -(cfg.sft_steps_budget + 1)
    warm: dict = {"checks": []}
    bar = tqdm(range(1, cfg.sft_steps_budget + 1), desc="warm start", dynamic_ncols=True)
    for step in bar:
        loss = sft(train_rows.sample(order, cfg.sft_batch))
        if step % 10 == 0:
            log.log(first_step + step, {"sft/loss": loss})
        if step % cfg.check_every == 0:
            probabilities = skill_probabilities(model, check_rows)
            skill = min(probabilities[f"{k}/skill"] for k in KINDS)
            warm["checks"].append((step, skill))
            log.log(
                first_step + step,
                {"sft/skill_probability": skill}
                | {f"sft/{k}": v for k, v in probabilities.items()},
            )
            bar.set_postfix(
                loss=f"{loss:.3f}",
                **{k: f"{probabilities[f'{k}/skill']:.2f}" for k in KINDS},
            )
            if skill >= cfg.skill_target:
                break
    bar.close()
    warm["steps"], warm["skill_probability"] = step, warm["checks"][-1][1]
    if warm["skill_probability"] < cfg.skill_target:
        print(
            f"warning: the warm start writes the solutions with probability "
            f"{warm['skill_probability']:.3f} after {step} steps, short of skill_target="
            f"{cfg.skill_target}; GRPO starts anyway (raise --sft-steps-budget)",
            file=sys.stderr,
            flush=True,
        )
    warm["after"] = skill_probabilities(model, check_rows)
    print(
        f"warm start: {step} steps; teacher-forced on the check problems: "
        + ", ".join(f"{k} {v:.3f}" for k, v in warm["after"].items()),
        flush=True,
    )
    return warm


def main(cfg: Config) -> dict:
    import gymnasium as gym

    import toolgrpo.envs  # noqa: F401 - registers the environments
    from toolgrpo.agents.chat import tool_turn_text
    from toolgrpo.agents.training import (
        RunLog,
        run_environment,
    )
    from toolgrpo.agents.training.cli import configure_logging, one_line_errors
    from toolgrpo.agents.training.rundir import prepare_run_directory
    from toolgrpo.envs.mixture import ProblemMixture
    from toolgrpo.envs.tools import BM25Index
    from toolgrpo.envs.tools.search import format_passages
    from toolgrpo.learners.tokenizer import train_chat_tokenizer

    configure_logging()
    cfg = cfg.shortened()
    t_start = time.perf_counter()
    with one_line_errors():
        prepare_run_directory(cfg.out, cfg, resume=False, overwrite=cfg.overwrite)
    log = RunLog(cfg.out, cfg, wandb_mode=cfg.wandb, plot_every=5, plot_name="select_grpo.png")
    world = World.generate(cfg.entities, seed=cfg.seed)
    corpus = os.path.join(cfg.out, "corpus.jsonl")
    world.write_corpus(corpus)
    train_problems = ProblemMixture(world.sources("train", seed=cfg.seed + 1), seed=cfg.seed)
    heldout = ProblemMixture(world.sources("heldout", seed=cfg.seed + 2), seed=cfg.seed)
    check = ProblemMixture(world.sources("train", seed=cfg.seed + 3), seed=cfg.seed + 3)

    def make_env(problems):
        return lambda: gym.make(
            "ToolUse-v0",
            tools=["python", "search"],
            problems=problems,
            corpus=corpus,
            search_k=cfg.search_k,
            max_turns=cfg.max_turns,
            system_prompt=SYSTEM_PROMPT,
        )

    # 1. demonstrations (a random first tool each), the tokenizer, the tiny model
    index = BM25Index.from_corpus(corpus)
    search = lambda query: format_passages(index.search([query], cfg.search_k)[0])

    def messages(make, indices):
        env = make()
        out = [env.reset(options={"index": i})[1]["messages"] for i in indices]
        env.close()
        return out

    rng = random.Random(cfg.seed)
    boundary = tool_turn_text(train_chat_tokenizer(["x"], vocab_size=300))
    prompts = messages(make_env(train_problems), range(cfg.sft_examples))
    train_demos = random_tool_demonstrations(train_problems, prompts, search, boundary, rng)
    # check problems: the first check_problems of each kind in a stream of their own
    picked = {kind: [] for kind in KINDS}
    for i in range(len(check)):
        kind = check[i].meta["kind"]
        if len(picked[kind]) < cfg.check_problems:
            picked[kind].append(i)
        if all(len(v) == cfg.check_problems for v in picked.values()):
            break
    indices = [i for kind in KINDS for i in picked[kind]]
    check_demos = [
        (
            prompt,
            demonstration(check[i], FIRST_TOOL[check[i].meta["kind"]], search, boundary, rng),
            check[i].meta["kind"],
        )
        for i, prompt in zip(indices, messages(make_env(check), indices))
    ]
    texts = [SYSTEM_PROMPT] * 10 + [
        m[-1]["content"] + "".join(t for t, _ in segs) for m, segs, _ in train_demos
    ]
    tokenizer = train_chat_tokenizer(texts, vocab_size=cfg.vocab_size)
    train_rows, check_rows = encode(tokenizer, train_demos), encode(tokenizer, check_demos)
    model = tiny_qwen2(tokenizer, cfg.hidden_size, cfg.layers, cfg.head_dim, cfg.seed)

    # 2. the warm start
    warm = warm_start(model, cfg, train_rows, check_rows, log)
    t_sft = time.perf_counter() - t_start

    # 3. GRPO with LoRA through the JAX sampler, the sandbox and the index
    before, after = grpo_phase(
        model,
        tokenizer,
        cfg,
        make_env(train_problems),
        make_env(heldout),
        log,
        first_problem=cfg.sft_examples,  # never seen in the warm start
        on_warm_start=lambda m: print("warm start, held out:", _figures(m), flush=True),
    )
    print("after GRPO, held out:", _figures(after), flush=True)
    log.close()
    summary = {
        "warm_start": {"held_out": _figures(before), **warm},
        "final": {"held_out": _figures(after)},
        "wall_s": time.perf_counter() - t_start,
        "sft_s": t_sft,
        "eval_problems": cfg.eval_problems,
        "grpo_steps": cfg.grpo_steps,
        "quick": cfg.quick,
        "seed": cfg.seed,
        "environment": run_environment(),
    }
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return summary


def _figures(metrics: dict) -> dict:
    """The held-out figures the demo reports: accuracy and selection accuracy, overall and per
    kind, and the tool-use rate."""
    out = {
        "accuracy": metrics["eval/pass@1"],
        "selection_accuracy": metrics["eval/selection_accuracy"],
        "tool_use_rate": metrics["eval/tool_use_rate"],
    }
    for kind in KINDS:
        for key in ("accuracy", "selection_accuracy"):
            out[f"{kind}/{key}"] = metrics.get(f"eval/source/{kind}/{key}", float("nan"))
    return out


if __name__ == "__main__":
    main(tyro.cli(Config))
