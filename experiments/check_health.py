"""The training-health monitor over a run that has ended (or one still running): what it warns
of, step by step, from the run directory's metrics.jsonl, with today's or other thresholds.

    uv run python experiments/check_health.py runs/aime_grpo
    uv run python experiments/check_health.py runs/arith --health.entropy-floor 0.3 --json

The group size comes from the run's config.json (the main job's rollout.group_size, the demo's
group_size). Prints one line a warning and a count per signal; --json prints them as JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import tyro

from toolgrpo.agents.training.health import SIGNALS, HealthConfig, HealthMonitor
from toolgrpo.agents.training.runlog import read_metrics


@dataclass(frozen=True)
class Args:
    run: tyro.conf.Positional[str]
    """The run directory (metrics.jsonl, config.json)."""
    health: HealthConfig = field(default_factory=HealthConfig)
    json: bool = False
    """Print the report as JSON."""


def group_size_of(run: str) -> int | None:
    """The run's episodes per problem, from its config.json (None where it names none)."""
    path = os.path.join(run, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        cfg = json.load(f)
    size = cfg.get("rollout", {}).get("group_size", cfg.get("group_size"))
    return int(size) if size is not None else None


def report(run: str, health: HealthConfig) -> dict:
    """{"steps": steps seen, "warnings": [{"step", "signal", "message"}], "counts": per signal}."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run} holds no metrics.jsonl: is it a run directory?")
    monitor = HealthMonitor(health, group_size=group_size_of(run))
    records = [r for r in read_metrics(path) if "train/reward" in r and r.get("step", 0) > 0]
    warnings = []
    for record in records:
        for w in monitor.observe(record["step"], record)[1]:
            warnings.append({"step": record["step"], "signal": w.signal, "message": w.message})
    counts = {name: sum(w["signal"] == name for w in warnings) for name in SIGNALS}
    return {"steps": len(records), "warnings": warnings, "counts": counts}


def main(args: Args) -> dict:
    out = report(args.run, args.health)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for w in out["warnings"]:
            print(f"step {w['step']}: {w['message']}")
        raised = ", ".join(f"{k} {v}" for k, v in out["counts"].items() if v) or "none"
        print(f"{out['steps']} steps; warnings: {raised}")
    return out


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
