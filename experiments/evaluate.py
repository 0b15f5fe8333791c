"""Evaluate a model on a registered environment: pass@1, pass@k, answer and tool statistics.

    python experiments/evaluate.py --model Qwen/Qwen2.5-0.5B-Instruct                  # base model
    python experiments/evaluate.py --model Qwen/Qwen2.5-0.5B-Instruct --adapter runs/x/adapter
    python experiments/evaluate.py --endpoint http://127.0.0.1:8000 --tokenizer Qwen/Qwen2.5-0.5B-Instruct
    python experiments/evaluate.py --model DIR --env-id ToolMath-Arith-v0 --limit 50 --json \
        --rollout.group-size 4 --rollout.temperature 0.6
    python experiments/evaluate.py --model DIR --adapter runs/x/adapter --env-config runs/x/config.json

A model (hub id or local directory, optionally with a PEFT adapter) runs in-process with the JAX
sampler; an endpoint is any server with vLLM's OpenAI-compatible completions API (vLLM itself, or
`python -m toolgrpo.agents.serve`). Prints a table (or --json), and writes --report PATH as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from toolgrpo.agents.rollout import RolloutConfig
from toolgrpo.agents.training.config import EnvConfig


@dataclass(frozen=True)
class Args:
    """What to evaluate, on what, and how."""

    model: str | None = None
    """Hub id or local directory of a Qwen2 model (run in-process)."""
    adapter: str | None = None
    """A PEFT LoRA adapter directory applied to --model."""
    endpoint: str | None = None
    """URL of an OpenAI-compatible server (instead of --model)."""
    endpoint_model: str | None = None
    """Model name at the endpoint (default: its first base model)."""
    tokenizer: str | None = None
    """Tokenizer (default: --model's); required with --endpoint."""
    env_config: str | None = None
    """A main-job config file (YAML/JSON) or a run's config.json: its env section is the
    environment (ToolUse-v0's tools and sources too), in place of --env-id, --problems,
    --protocol and --max-turns; --split picks the sources' problems or eval_problems."""
    env_id: str = "ToolMath-AIME-v0"
    """A registered environment (toolgrpo.envs.ENV_IDS)."""
    problems: str | None = None
    """Problem source override: hub id or local JSON/JSONL/CSV/Parquet file."""
    split: str = "test"
    """Data split."""
    limit: int | None = None
    """Evaluate the first N problems (required for generated environments like Arith)."""
    k: tuple[int, ...] = (1, 8)
    """The k of pass@k (each <= rollout.group_size, the samples per problem)."""
    protocol: str = "markdown"
    """Tool protocol: "markdown" or "qwen"."""
    max_turns: int = 4
    """Assistant turns per episode."""
    seed: int = 0
    """Sampling seed."""
    report: str | None = None
    """Write the JSON report here."""
    json: bool = False
    """Print the JSON report instead of a table."""
    debug: bool = False
    """Show the traceback of an input error instead of its one-line message."""
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    """How episodes are played; group_size is the samples per problem."""

    def __post_init__(self):
        if (self.model is None) == (self.endpoint is None):
            raise ValueError("give exactly one of --model and --endpoint")
        if self.endpoint and not self.tokenizer:
            raise ValueError("--endpoint needs --tokenizer (prompts are sent as token ids)")
        if self.adapter and not self.model:
            raise ValueError("--adapter applies to --model")
        n = self.rollout.group_size
        if any(k < 1 or k > n for k in self.k):
            raise ValueError(f"every k must be in 1..rollout.group_size ({n}), got {self.k}")


def check_tokenizer_of(args: Args):
    """The tokenizer, after the main job's checks (toolgrpo.agents.training.checks) of every input but
    the problems: the model's files, the adapter's, the endpoint's answer."""
    from toolgrpo.agents.training.checks import (
        check_adapter,
        check_context_length,
        check_model,
        check_server,
        check_tokenizer,
    )
    from toolgrpo.learners.params import resolve
    from toolgrpo.learners.tokenizer import load_tokenizer

    if args.endpoint:
        assert args.tokenizer is not None  # Args: --endpoint needs --tokenizer
        check_server(args.endpoint, flag="--endpoint")
        return load_tokenizer(args.tokenizer)
    assert args.model is not None  # Args: exactly one of --model and --endpoint
    config = check_model(resolve(args.model))
    tokenizer = check_tokenizer(args.tokenizer or args.model, config)
    check_context_length(config, args.rollout.max_total_tokens)
    if args.adapter:
        check_adapter(args.adapter)
    return tokenizer


def open_sampler(args: Args, tokenizer):
    """(the sampler, the evaluated model's name)."""
    if args.endpoint:
        from toolgrpo.agents.vllm_client import VLLMSampler

        sampler = VLLMSampler(args.endpoint, tokenizer, model=args.endpoint_model)
        return sampler, f"{args.endpoint} ({sampler.model})"
    from toolgrpo.agents.sampler import JaxSampler
    from toolgrpo.learners.lora import load_peft_adapter
    from toolgrpo.learners.params import from_pretrained

    assert args.model is not None  # Args: exactly one of --model and --endpoint
    model = from_pretrained(args.model)
    if args.adapter:
        load_peft_adapter(model, args.adapter)
    eos = [t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None]
    name = args.model + (f" + {args.adapter}" if args.adapter else "")
    return JaxSampler(model, tokenizer, eos_token_ids=eos), name


@dataclass(frozen=True)
class _EnvOnly:
    """The env section of a main-job config (the file's other sections are not read)."""

    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)


def env_section(path: str) -> EnvConfig:
    """The EnvConfig of a main-job config file or a run's config.json: its "env" section laid
    over the defaults, as the main job reads it."""
    from toolgrpo.agents.training.cli import read_config_file

    return read_config_file(path, _EnvOnly, _EnvOnly(), only=("env",)).env


def main(args: Args) -> dict:
    import gymnasium as gym

    import toolgrpo.envs
    from toolgrpo.agents.rollout import Rollouts
    from toolgrpo.agents.training import evaluate
    from toolgrpo.agents.training.checks import check_context_budget
    from toolgrpo.agents.training.cli import one_line_errors
    from toolgrpo.envs.toolmath import problems_of

    env_id = args.env_id
    kwargs: dict[str, Any] = {  # the environment's, of several types
        "protocol": args.protocol,
        "max_turns": args.max_turns,
        "split": args.split,
        **({"problems": args.problems} if args.problems else {}),
    }
    with one_line_errors(debug=args.debug):  # every input checked before the model loads
        if args.env_config:
            env = env_section(args.env_config)
            env_id, kwargs = env.env_id, env.env_kwargs(args.split)
        if env_id not in toolgrpo.envs.ENV_IDS:
            raise ValueError(
                f"--env-id {env_id!r} is not one of {', '.join(toolgrpo.envs.ENV_IDS)}"
            )
        tokenizer = check_tokenizer_of(args)
        env = gym.make(env_id, **kwargs)
        available = len(problems_of(env))
        n = min(available, args.limit or available)
        if n > 100_000:
            raise ValueError(f"{env_id} has {available} problems: pass --limit N")
        check_context_budget(env, tokenizer, range(min(n, 4096)), args.rollout)
        env.close()
        sampler, name = open_sampler(args, tokenizer)
    with Rollouts(lambda: gym.make(env_id, **kwargs), sampler, tokenizer, args.rollout) as rollouts:
        metrics, _ = evaluate(rollouts, list(range(n)), ks=args.k, seed=args.seed)
    report = {"model": name, "env_id": env_id, **metrics}
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report))
    else:
        width = max(map(len, report))
        for key, value in report.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            print(f"{key:<{width}}  {shown}")
    return report


if __name__ == "__main__":
    from toolgrpo.agents.training.cli import (
        configure_logging,
        exit_codes,
        load_config,
        one_line_errors,
    )

    configure_logging()
    with one_line_errors(debug="--debug" in sys.argv):
        arguments = load_config(sys.argv[1:], Args, description=__doc__.split("\n\n")[0])
    with exit_codes(
        debug=arguments.debug,
        offline_hint="offline? pass a local model directory (--model DIR) and problems file "
        "(--problems FILE)",
    ):
        main(arguments)
