"""A run's record: metrics.jsonl, transcripts and PNG plots in the run directory, Weights &
Biases optionally, and what the figures depend on besides the config (run_environment).

    log = RunLog("runs/x", cfg, wandb_mode="off")
    log.log(step, {"train/reward": 0.4}); log.transcripts(step, texts); log.close()
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from typing import Any, Literal, Protocol

WandbMode = Literal["online", "offline", "off"]

PLOTS = {
    "reward": ("train/reward", "eval/reward"),
    "accuracy": ("train/accuracy", "eval/pass@1"),
    "tool_use": ("train/tool_use_rate", "eval/tool_use_rate", "train/tool_error_rate"),
    "kl_entropy": ("train/kl", "train/entropy"),
    "lengths": ("train/sampled_tokens", "train/total_tokens"),
}


NUMERICS_PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "numpy",
    "tokenizers",
    "transformers",
    "orbax-checkpoint",
    "gymnasium",
    "sympy",
)
"""The packages whose versions can change a run's numbers (README: Reproducibility)."""


def run_environment() -> dict:
    """What a run's figures depend on besides its config: package versions, the backend and
    the machine (CPU model and the vector extensions XLA compiles for)."""
    from importlib import metadata

    import jax

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    cpu, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in info.splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
        present = set(
            next(
                (
                    line.split(":", 1)[1].split()
                    for line in info.splitlines()
                    if line.startswith("flags")
                ),
                [],
            )
        )
        flags = sorted(
            f
            for f in present
            if f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
        )
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "packages": {name: version(name) for name in NUMERICS_PACKAGES},
    }


class StepLog(Protocol):
    """What `fit` logs to: a RunLog, or anything else with its log and transcripts."""

    def log(self, step: int, metrics: dict) -> None: ...

    def transcripts(self, step: int, texts: Sequence[str], tag: str = "train") -> None: ...


class RunLog:
    """metrics.jsonl, transcripts and PNG plots in `directory`; Weights & Biases optionally
    ("online" with a key, "offline" otherwise, or "off"). The W&B run's id is kept in
    `directory/wandb_run_id`: a resumed run logs to the same W&B run."""

    def __init__(
        self,
        directory: str,
        config: Any,
        wandb_mode: WandbMode = "off",
        project: str = "toolgrpo",
        plot_every: int = 5,
        plot_name: str = "metrics.png",
        resume: bool = False,
    ):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.plot_every, self.plot_name = directory, plot_every, plot_name
        self._count = 0
        cfg = asdict(config) if is_dataclass(config) else dict(config)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({**cfg, "environment": run_environment()}, f, indent=2, default=str)
        self.wandb = None
        if wandb_mode != "off":
            import wandb

            mode = wandb_mode
            if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _wandb_logged_in()):
                mode = "offline"
            id_path = os.path.join(directory, "wandb_run_id")
            run_id = None
            if resume and os.path.exists(id_path):
                with open(id_path) as f:
                    run_id = f.read().strip()
            self.wandb = wandb.init(
                project=project,
                config=cfg,
                dir=directory,
                mode=mode,
                id=run_id,
                resume="allow" if run_id else None,
            )
            with open(id_path, "w") as f:
                f.write(self.wandb.id + "\n")

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        with open(os.path.join(self.directory, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self._count += 1
        if self._count % self.plot_every == 0:
            self.plot()

    def transcripts(self, step: int, texts: Sequence[str], tag: str = "train") -> None:
        path = os.path.join(self.directory, "transcripts", f"{tag}_{step:06d}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rule = "\n\n" + "=" * 100 + "\n"
        with open(path, "w") as f:
            f.write(
                "".join(
                    f"{rule}episode {i + 1} of {len(texts)}: {text}" for i, text in enumerate(texts)
                )
                + "\n"
            )

    def plot(self) -> str | None:
        return plot_metrics(
            os.path.join(self.directory, "metrics.jsonl"),
            os.path.join(self.directory, self.plot_name),
        )

    def close(self) -> None:
        self.plot()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_logged_in() -> bool:
    return os.path.exists(os.path.expanduser("~/.netrc"))


def truncate_metrics(path: str, step: int) -> int:
    """Drop the records of steps after `step` from a metrics.jsonl (a run resumed from the
    checkpoint of `step` logs them again); returns how many were dropped."""
    records = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) < len(records):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)
    return len(records) - len(kept)


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(jsonl: str, png: str) -> str | None:
    """One PNG with a panel per group of PLOTS (the ones the run has logged)."""
    records = read_metrics(jsonl)
    panels = [
        (name, [k for k in keys if any(k in r for r in records)]) for name, keys in PLOTS.items()
    ]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
