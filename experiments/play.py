"""Play a ToolMath episode by hand: you are the model.

    uv run python experiments/play.py                          # ToolMath-Arith-v0
    uv run python experiments/play.py --env-id ToolMath-AIME-v0 --problems aime.jsonl

Type an assistant turn and finish it with a line holding only "." (or end input). A turn with a
```python block runs the code; a turn with \\boxed{...} and no code after it is the final answer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import tyro

import toolgrpo.envs  # noqa: F401 - registers the environments


@dataclass(frozen=True)
class Args:
    """Interactive episode settings."""

    env_id: str = "ToolMath-Arith-v0"
    """A registered id (toolgrpo.envs.ENV_IDS)."""
    problems: str | None = None
    """Problem source override: a hub id or a local JSON/JSONL/CSV/Parquet file."""
    protocol: str = "markdown"
    """Tool protocol: "markdown" or "qwen"."""
    seed: int = 0
    """Seed that picks the problem."""


def read_turn() -> str | None:
    lines = []
    for line in sys.stdin:
        if line.rstrip("\n") == ".":
            return "".join(lines)
        lines.append(line)
    return "".join(lines) if lines else None


def main(args: Args) -> None:
    kwargs: dict[str, Any] = {"protocol": args.protocol}  # the environment's
    if args.problems:
        kwargs["problems"] = args.problems
    env = gym.make(args.env_id, **kwargs)
    obs, info = env.reset(seed=args.seed)
    print(f"[system]\n{info['messages'][0]['content']}\n\n[user]\n{obs}\n")
    print(f"(stop sequences an agent would use: {info['stop']!r})\n")
    while True:
        print("[assistant] (end with a line '.')")
        turn = read_turn()
        if turn is None:
            break
        obs, reward, terminated, truncated, info = env.step(turn)
        if obs:
            print(f"[{'tool' if args.protocol == 'qwen' else 'observation'}]\n{obs}")
        if terminated or truncated:
            print(
                f"episode over ({'final answer' if terminated else 'truncated'}): "
                f"answer={info['answer']!r} gold={info['gold_answer']!r} "
                f"reward={reward:.2f} components={info['reward_components']} tool={info['tool']}"
            )
            break
    env.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
