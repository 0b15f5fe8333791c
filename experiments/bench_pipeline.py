"""Benchmark pipelined GRPO steps against synchronous ones: the same loop (toolgrpo.agents.training.fit,
Rollouts, the environment, the JAX learner) run with max_staleness 0 and then 1, in one run.

    uv run python experiments/bench_pipeline.py            # a table
    uv run python experiments/bench_pipeline.py --json     # one JSON object

The rollout engine is a stand-in for a GPU server elsewhere: `LatencyEngine` sleeps for
`per_token_ms` a generated token of the longest sample of each request round (a batched server's
latency; sleeping leaves the CPU to the learner, as a remote server would), and answers each
"Compute a x b." problem right with probability 1/2, so groups have rewards that differ. Its
time per token is calibrated so that a step's generation takes about as long as its update (the
median of a few timed updates): the case where overlap pays most, an ideal speedup of 2.

A side's steps a second are (steps - 1) over the wall time from its first logged step to its
last (the first step compiles); the sides run `repeats` times, alternating, and each figure is
the median of its runs; `speedup` is the median over the pairs of runs (run back to back, so
under about the same load) of pipelined / synchronous steps a second. `mean_staleness` is the
pipelined side's mean of train/staleness over every step (the first step's batch is fresh,
every later one one update old: (steps - 1) / steps).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from dataclasses import dataclass

import tyro


@dataclass(frozen=True)
class Args:
    """Pipeline benchmark settings."""

    steps: int = 8
    """GRPO steps of each side (the first one, which compiles, is not timed)."""
    problems_per_step: int = 8
    """Problems a step."""
    group_size: int = 4
    """Episodes a problem."""
    new_tokens: int = 48
    """Tokens the engine generates a sample."""
    hidden_size: int = 128
    """Width of the learner's Qwen2 (its update time sets the engine's latency)."""
    layers: int = 2
    """Decoder layers of the learner's Qwen2."""
    repeats: int = 5
    """Runs of each side, alternating (sync, pipelined, sync, ...); figures are medians, the
    speedup the median of each pair's ratio."""
    per_token_ms: float | None = None
    """The engine's latency a generated token; None: calibrated to the update time."""
    engine: str = "latency"
    """"latency": the stand-in above; "vllm": a real vLLM server (PyPI's CPU build from
    --vllm-python, its own process) serving the learner's model (head_dim 64, as vLLM's CPU
    attention needs), new adapters loaded at each sync: the real configuration, whose overlap
    on a CPU-only machine is bounded by the cores the server and the learner share."""
    vllm_python: str | None = None
    """Python of a vLLM install (default: $TOOLGRPO_VLLM_PYTHON, else .venv-vllm)."""
    json: bool = False
    """Print one JSON object instead of a table."""


class LatencyEngine:
    """A sampler (toolgrpo.agents.sampler's interface) that sleeps `per_token_s` a token of a round's
    longest sample. Each sample is "<the product or a wrong number>" boxed, padded with words to
    `new_tokens` tokens; log-probabilities are a constant."""

    def __init__(self, tokenizer, new_tokens: int, per_token_s: float):
        self.tokenizer, self.new_tokens, self.per_token_s = tokenizer, new_tokens, per_token_s
        self.adapter_version = 0
        self.generated_tokens = 0

    def sync_adapter(self, model, version: int) -> None:
        self.adapter_version = version

    def recover(self) -> None:
        """Nothing to bring back: it runs in this process (toolgrpo.agents.sampling.Sampler)."""

    def generate(self, prompts, params, adapter_version=None, *, seeds=None, max_new_tokens=None):
        import re

        from toolgrpo.agents.sampler import Sample

        version = self.adapter_version if adapter_version is None else adapter_version
        out, longest = [], 0
        for i, prompt in enumerate(prompts):
            text = self.tokenizer.decode(prompt, skip_special_tokens=False)
            a, b = map(int, re.findall(r"Compute (\d+) x (\d+)", text)[-1])
            rng = random.Random(seeds[i] if seeds else i)
            answer = a * b if rng.random() < 0.5 else a * b + 1
            ids = self.tokenizer.encode(f"So \\boxed{{{answer}}}.", add_special_tokens=False)
            pad = self.tokenizer.encode(" ok", add_special_tokens=False)
            budget = min(
                self.new_tokens, (max_new_tokens or [params.max_new_tokens] * len(prompts))[i]
            )
            ids = (pad * self.new_tokens)[: max(budget - len(ids) - 1, 0)] + ids
            ids = ids + [self.tokenizer.eos_token_id]
            longest = max(longest, len(ids))
            self.generated_tokens += len(ids)
            out.append(
                [
                    Sample(
                        ids,
                        [-1.0] * len(ids),
                        self.tokenizer.decode(ids, skip_special_tokens=True),
                        "eos",
                        version,
                        len(prompt),
                    )
                ]
            )
        time.sleep(self.per_token_s * longest)
        return out


class StepClock:
    """A RunLog that notes when each step was logged and its metrics."""

    def __init__(self):
        self.times: list[float] = []
        self.metrics: list[dict] = []

    def log(self, step: int, metrics: dict) -> None:
        self.times.append(time.perf_counter())
        self.metrics.append(metrics)

    def transcripts(self, step, texts, tag="train") -> None:
        pass


def build(args: Args):
    """(tokenizer, a fresh learner factory, make_env) for the benchmark."""
    from flax import nnx

    from toolgrpo.envs.problems import Problem
    from toolgrpo.envs.toolmath import ToolMathEnv
    from toolgrpo.learners.lora import apply_lora
    from toolgrpo.learners.qwen2 import Qwen2ForCausalLM
    from toolgrpo.learners.qwen2_config import Qwen2Config
    from toolgrpo.learners.tokenizer import train_chat_tokenizer

    rng = random.Random(0)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(512)]
    problems = [
        Problem(f"p{i}", f"Compute {a} x {b}.", str(a * b), "integer")
        for i, (a, b) in enumerate(pairs)
    ]
    tokenizer = train_chat_tokenizer(
        [p.question for p in problems[:64]] + ["So \\boxed{391}. ok ok"], vocab_size=400
    )
    head_dim = 64 if args.engine == "vllm" else 32  # vLLM's CPU attention takes 64 and up
    heads = args.hidden_size // head_dim

    def learner():
        cfg = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden_size,
            intermediate_size=3 * args.hidden_size,
            num_hidden_layers=args.layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=head_dim,
            rope_theta=10_000.0,
            max_position_embeddings=1024,
        )
        return apply_lora(
            Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), rank=8, alpha=16, rngs=nnx.Rngs(1)
        )

    make_env = lambda: ToolMathEnv(
        problems=problems, max_turns=1, system_prompt="Answer in \\boxed{}."
    )
    return tokenizer, learner, make_env, len(problems)


def run_side(
    args: Args, tokenizer, learner, make_env, n_problems: int, max_staleness: int, make_engine
) -> dict:
    """fit over args.steps steps with `max_staleness`: steps a second after the first step,
    the mean staleness, the mean collection and update times."""
    from toolgrpo.agents.rollout import RolloutConfig, Rollouts
    from toolgrpo.agents.training import GRPOLoop, ProblemOrder, fit
    from toolgrpo.agents.training.loop import sampler_copy
    from toolgrpo.learners.train import GRPOConfig, init_state

    model = learner()
    sampler_model = sampler_copy(model) if max_staleness else model
    engine = make_engine(sampler_model)
    cfg = GRPOConfig(learning_rate=1e-4, warmup_steps=1, schedule="constant", micro_batch_size=None)
    roll = RolloutConfig(
        group_size=args.group_size,
        max_turn_tokens=args.new_tokens,
        max_total_tokens=512,
        tool_workers=4,
        sync_rounds=True,
    )
    clock = StepClock()
    with Rollouts(make_env, engine, tokenizer, roll) as rollouts:
        loop = GRPOLoop(
            model=model,
            state=init_state(model, cfg),
            cfg=cfg,
            rollouts=rollouts,
            problems_per_step=args.problems_per_step,
            max_staleness=max_staleness,
            sampler_model=sampler_model if max_staleness else None,
        )
        fit(loop, ProblemOrder(n_problems), clock, start=0, steps=args.steps, seed=0)
    timed = clock.times[-1] - clock.times[0]
    later = clock.metrics[1:]
    return {
        "steps_per_s": (args.steps - 1) / timed,
        "mean_staleness": statistics.mean(m["train/staleness"] for m in clock.metrics),
        "collect_s": statistics.mean(m["time/collect_s"] for m in later),
        "update_s": statistics.mean(m["time/update_s"] for m in later),
    }


def calibrate(args: Args, tokenizer, learner, make_env, n_problems: int) -> tuple[float, float]:
    """(median update seconds of a step's batch, after compilation; per-token seconds that make
    a step's generation take that long)."""
    import jax

    from toolgrpo.agents.rollout import RolloutConfig, Rollouts
    from toolgrpo.learners.train import GRPOConfig, grpo_step, init_state

    engine = LatencyEngine(tokenizer, args.new_tokens, 0.0)
    roll = RolloutConfig(
        group_size=args.group_size,
        max_turn_tokens=args.new_tokens,
        max_total_tokens=512,
        tool_workers=4,
        sync_rounds=True,
    )
    with Rollouts(make_env, engine, tokenizer, roll) as rollouts:
        batch = rollouts.collect(list(range(args.problems_per_step)), seed=0)
    model = learner()
    times = []
    for tis_cap in (None, 2.0):  # both sides' programs compiled before anything is timed
        cfg = GRPOConfig(
            learning_rate=1e-4,
            warmup_steps=1,
            schedule="constant",
            micro_batch_size=None,
            tis_cap=tis_cap,
        )
        state = init_state(model, cfg)
        for i in range(4):
            t0 = time.perf_counter()
            state, _ = grpo_step(state, batch, cfg)
            jax.block_until_ready(state.lora)
            if i:
                times.append(time.perf_counter() - t0)
    update_s = statistics.median(times)
    return update_s, update_s / args.new_tokens  # one generation round a step


def main(args: Args) -> dict:
    import contextlib
    import tempfile

    import jax

    import toolgrpo.envs  # noqa: F401 - registers the environments

    tokenizer, learner, make_env, n = build(args)
    update_s, per_token_s = calibrate(args, tokenizer, learner, make_env, n)
    if args.per_token_ms is not None:
        per_token_s = args.per_token_ms / 1e3
    runs = {0: [], 1: []}
    with contextlib.ExitStack() as stack:
        if args.engine == "vllm":
            from toolgrpo.agents.vllm_client import VLLMSampler
            from toolgrpo.agents.vllm_server import VLLMServer, vllm_command
            from toolgrpo.learners.params import save_pretrained

            directory = stack.enter_context(tempfile.TemporaryDirectory())
            save_pretrained(learner(), directory)
            tokenizer.save_pretrained(directory)
            python = (
                args.vllm_python
                or os.environ.get("TOOLGRPO_VLLM_PYTHON")
                or os.path.join(
                    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    ".venv-vllm",
                    "bin",
                    "python",
                )
            )
            server = stack.enter_context(
                VLLMServer(
                    directory,
                    max_lora_rank=8,
                    command=vllm_command(python),
                    env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                    extra_args=["--max-model-len", "1024", "--dtype", "float32"],
                )
            )
            make_engine = lambda model: VLLMSampler(server.url, tokenizer)
        else:
            make_engine = lambda model: LatencyEngine(tokenizer, args.new_tokens, per_token_s)
        for _ in range(args.repeats):  # alternating: a change in the machine's load hits both
            for staleness in (0, 1):
                runs[staleness].append(
                    run_side(args, tokenizer, learner, make_env, n, staleness, make_engine)
                )
    sync, pipelined = (
        {k: statistics.median(r[k] for r in runs[s]) for k in runs[s][0]} for s in (0, 1)
    )
    return {
        "sync_steps_per_s": sync["steps_per_s"],
        "pipelined_steps_per_s": pipelined["steps_per_s"],
        # each pair ran back to back, under about the same load: the median of their ratios
        "speedup": statistics.median(
            p["steps_per_s"] / q["steps_per_s"] for p, q in zip(runs[1], runs[0])
        ),
        "mean_staleness": pipelined["mean_staleness"],
        "sync_mean_staleness": sync["mean_staleness"],
        "calibrated_update_s": update_s,
        "per_token_ms": per_token_s * 1e3,
        "sync_collect_s": sync["collect_s"],
        "sync_update_s": sync["update_s"],
        "pipelined_collect_s": pipelined["collect_s"],
        "pipelined_update_s": pipelined["update_s"],
        "sync_steps_per_s_runs": [r["steps_per_s"] for r in runs[0]],
        "pipelined_steps_per_s_runs": [r["steps_per_s"] for r in runs[1]],
        "speedup_runs": [p["steps_per_s"] / q["steps_per_s"] for p, q in zip(runs[1], runs[0])],
        "engine": args.engine,
        "steps": args.steps,
        "repeats": args.repeats,
        "problems_per_step": args.problems_per_step,
        "group_size": args.group_size,
        "new_tokens": args.new_tokens,
        "cpu_count": os.cpu_count(),
        "device": jax.devices()[0].platform,
    }


if __name__ == "__main__":
    args = tyro.cli(Args)
    report = main(args)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:24s} {value:.4g}" if isinstance(value, float) else f"{key:24s} {value}")
