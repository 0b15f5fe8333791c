"""What the scripts' tests share: running an experiment script as a user would, reading its
metrics, and the flags of a main-job run on the tiny model."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str, stdin: str | None = None, timeout: int = 300) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / name), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def tiny_run_args(model, train, test, out):
    return [
        "--model.name",
        model,
        "--env.problems",
        train,
        "--env.eval-problems",
        test,
        "--out",
        out,
        "--problems-per-step",
        "2",
        "--rollout.group-size",
        "2",
        "--grpo.micro-batch-size",
        "2",
        "--model.lora-rank",
        "4",
        "--rollout.max-turn-tokens",
        "12",
        "--rollout.max-total-tokens",
        "512",
        "--eval.samples",
        "2",
        "--eval.every",
        "2",
        "--log.checkpoint-every",
        "1",
        "--log.no-wandb",
        "--sampler.engine",
        "jax",
    ]
