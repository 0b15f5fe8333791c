"""The GRPO loop shared by the experiments: collect, (dynamic sampling), update, sync, log, evaluate.

experiments/aime_grpo.py and experiments/arith_grpo.py wire their model, sampler and environments
and hand them to `GRPOLoop`; experiments/evaluate.py uses `evaluate`. Logging goes to a run
directory (metrics.jsonl, transcripts, PNG plots refreshed during the run) and to Weights & Biases
when asked.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from flax import nnx

from agents.batch import RolloutBatch, episode_metrics
from agents.rollout import Rollouts
from learners.train import GRPOConfig, grpo_step

PLOTS = {"reward": ("train/reward", "eval/reward"), "accuracy": ("train/accuracy", "eval/pass@1"),
         "tool_use": ("train/tool_use_rate", "eval/tool_use_rate", "train/tool_error_rate"),
         "kl_entropy": ("train/kl", "train/entropy"),
         "lengths": ("train/sampled_tokens", "train/total_tokens")}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def evaluate(rollouts: Rollouts, indices: Sequence[int], ks: Sequence[int] = (1,), seed: int = 0,
             chunk: int = 64, adapter_version: int | None = None) -> tuple[dict, list[str]]:
    """pass@k over `indices` with rollouts.cfg.group_size samples a problem, plus answer and tool
    statistics; returns (metrics, a few transcripts)."""
    n = rollouts.cfg.group_size
    per_chunk = max(1, chunk // n)
    correct, episodes, transcripts = [], [], []
    for start in range(0, len(indices), per_chunk):
        batch = rollouts.collect(indices[start:start + per_chunk], seed=seed + start,
                                 adapter_version=adapter_version)
        for g in range(len(indices[start:start + per_chunk])):
            correct.append(sum(e.correct for e in batch.episodes if e.group == g))
        episodes += batch.episodes
        transcripts += batch.transcripts[:2]
    metrics = {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for c in correct])) for k in ks}
    summary = episode_metrics(episodes)
    metrics.update({k: summary[k] for k in ("reward", "tool_use_rate", "tool_error_rate", "turns",
                                            "answer_rate", "truncated_context", "sampled_tokens")})
    metrics["problems"], metrics["samples_per_problem"] = len(indices), n
    return metrics, transcripts


def concat_batches(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
    """One batch from several (group ids made distinct, rows padded to the longest)."""
    t = max(b.tokens.shape[1] for b in batches)
    pad = lambda x, v: np.pad(x, ((0, 0), (0, t - x.shape[1])), constant_values=v)  # noqa: E731
    offsets = np.cumsum([0] + [int(b.group_ids.max()) + 1 for b in batches[:-1]])
    return RolloutBatch(
        tokens=np.concatenate([pad(b.tokens, pad_id) for b in batches]),
        loss_mask=np.concatenate([pad(b.loss_mask, 0) for b in batches]),
        sampler_logprobs=np.concatenate([pad(b.sampler_logprobs, 0) for b in batches]),
        rewards=np.concatenate([b.rewards for b in batches]),
        group_ids=np.concatenate([b.group_ids + o for b, o in zip(batches, offsets)]),
        adapter_version=np.concatenate([b.adapter_version for b in batches]),
        lengths=np.concatenate([b.lengths for b in batches]),
        episodes=[e for b in batches for e in b.episodes],
        transcripts=[s for b in batches for s in b.transcripts])


def select_groups(batch: RolloutBatch, keep: np.ndarray) -> RolloutBatch:
    """The rows of `batch` where `keep` is true."""
    rows = np.flatnonzero(keep)
    return RolloutBatch(batch.tokens[rows], batch.loss_mask[rows], batch.sampler_logprobs[rows],
                        batch.rewards[rows], batch.group_ids[rows], batch.adapter_version[rows],
                        batch.lengths[rows], [batch.episodes[i] for i in rows],
                        [batch.transcripts[i] for i in rows])


def informative(batch: RolloutBatch) -> np.ndarray:
    """Rows whose group's rewards differ (a zero-variance group has zero advantage)."""
    keep = np.zeros(len(batch.rewards), bool)
    for g in np.unique(batch.group_ids):
        rows = batch.group_ids == g
        keep[rows] = np.ptp(batch.rewards[rows]) > 1e-9
    return keep


NUMERICS_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "tokenizers", "transformers",
                     "orbax-checkpoint", "gymnasium", "sympy")
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
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                    if line.startswith("model name")), cpu)
        present = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                            if line.startswith("flags")), []))
        flags = sorted(f for f in present if f in ("avx2", "fma", "avx512f", "avx512_bf16",
                                                    "avx512_fp16", "amx_tile", "amx_bf16"))
    except OSError:
        pass
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": cpu, "cpu_flags": flags, "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "packages": {name: version(name) for name in NUMERICS_PACKAGES}}


class RunLog:
    """metrics.jsonl, transcripts and PNG plots in `directory`; Weights & Biases optionally
    ("online" with a key, "offline" otherwise, or "off"). The W&B run's id is kept in
    `directory/wandb_run_id`: a resumed run logs to the same W&B run."""

    def __init__(self, directory: str, config: Any, wandb_mode: str = "off",
                 project: str = "toolgrpo", plot_every: int = 5, plot_name: str = "metrics.png",
                 resume: bool = False):
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
            self.wandb = wandb.init(project=project, config=cfg, dir=directory, mode=mode,
                                    id=run_id, resume="allow" if run_id else None)
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
            f.write("".join(f"{rule}episode {i + 1} of {len(texts)}: {text}"
                            for i, text in enumerate(texts)) + "\n")

    def plot(self) -> str | None:
        return plot_metrics(os.path.join(self.directory, "metrics.jsonl"),
                            os.path.join(self.directory, self.plot_name))

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


RESUMABLE_CHANGES = frozenset({
    "steps", "resume", "overwrite", "out", "debug", "allow_cpu", "eval_every", "eval_limit",
    "checkpoint_every",
    "keep_checkpoints", "wandb", "wandb_project", "export_merged", "sampler", "vllm_url",
    "vllm_gpu_memory"})
"""Settings a resumed run may change; any other difference from the saved config.json stops it."""


def config_changes(saved: dict, config: dict, allowed=RESUMABLE_CHANGES) -> list[str]:
    """'setting: old -> new' for every setting of `config` whose saved value differs."""
    changes = []
    for key, value in config.items():
        if key in allowed or key not in saved:
            continue
        old = saved[key]
        if json.loads(json.dumps(value, default=str)) != old:
            changes.append(f"{key}: {old!r} -> {value!r}")
    return changes


def fail(message: str):
    """End the program with `message` as one line on stderr and exit code 2 (bad input)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def prepare_run_directory(out: str, config: Any, resume: bool, overwrite: bool) -> None:
    """A run directory holds one run. A new run needs an empty (or missing) `out`, or
    `overwrite`, which deletes what is there; `resume` needs the saved config to agree with
    `config` but for RESUMABLE_CHANGES. Otherwise it says why in one line and exits with 2."""
    import shutil

    cfg = asdict(config) if is_dataclass(config) else dict(config)
    present = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if resume:
        saved_path = os.path.join(out, "config.json")
        if os.path.exists(saved_path):
            with open(saved_path) as f:
                saved = json.load(f)
            changes = config_changes(saved, cfg)
            if changes:
                fail(f"--resume with settings that differ from the run in {out}: "
                        f"{'; '.join(changes)} (resume with the saved settings, or start a new "
                        f"run with another --out)")
        return
    if present and not overwrite:
        fail(f"{out} already holds a run ({', '.join(present[:4])}"
                f"{', ...' if len(present) > 4 else ''}); continue it with --resume, replace it "
                f"with --overwrite, or choose another --out")
    if present:
        shutil.rmtree(out)


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(jsonl: str, png: str) -> str | None:
    """One PNG with a panel per group of PLOTS (the ones the run has logged)."""
    records = read_metrics(jsonl)
    panels = [(name, [k for k in keys if any(k in r for r in records)])
              for name, keys in PLOTS.items()]
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


class GracefulInterrupt:
    """Turns the first Ctrl-C into a flag, so that the loop can checkpoint before exiting."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, saving a checkpoint, then exiting "
              "(Ctrl-C again to stop at once)", flush=True)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


@dataclass
class GRPOLoop:
    """Collect a batch, optionally refill zero-variance groups (DAPO's dynamic sampling), take
    GRPO steps, push the new adapter to the sampler. `problems` yields problem indices."""

    model: Any
    state: Any
    cfg: GRPOConfig
    rollouts: Rollouts
    problems_per_step: int
    dynamic_sampling: bool = False
    max_refills: int = 2

    def collect(self, problems: Iterator[int], seed: int) -> tuple[RolloutBatch, dict]:
        batch = self.rollouts.collect([next(problems) for _ in range(self.problems_per_step)],
                                      seed=seed, adapter_version=int(self.state.step))
        # the first collection's, before zero-variance groups are dropped: a collapse detector
        stats = {"collected_groups": self.problems_per_step,
                 "distinct_completions": batch.distinct_completions()}
        if not self.dynamic_sampling:
            return batch, stats
        kept = [select_groups(batch, informative(batch))]
        refills = 0
        n_groups = lambda: sum(len(np.unique(b.group_ids)) for b in kept)  # noqa: E731
        while n_groups() < self.problems_per_step and refills < self.max_refills:
            refills += 1
            more = self.rollouts.collect([next(problems) for _ in range(self.problems_per_step)],
                                         seed=seed + 7919 * refills,
                                         adapter_version=int(self.state.step))
            kept.append(select_groups(more, informative(more)))
            stats["collected_groups"] += self.problems_per_step
        kept = [b for b in kept if len(b.rewards)]
        stats["refills"] = refills
        if not kept:  # every group was uniform: its advantages, hence its gradient, are zero;
            # the step is still taken so that optimizer steps and loop steps stay one count
            return batch, {**stats, "all_groups_uniform": 1}
        return concat_batches(kept, self.rollouts.tokenizer.pad_token_id or 0), stats

    def update(self, batch: RolloutBatch) -> dict:
        self.state, metrics = grpo_step(self.state, batch.arrays(), self.cfg)
        nnx.update(self.model, self.state.lora)  # the in-process sampler reads the live model
        self.rollouts.sampler.sync_adapter(self.model, int(self.state.step))
        return metrics

    def step(self, problems: Iterator[int], seed: int) -> tuple[dict, RolloutBatch]:
        t0 = time.perf_counter()
        batch, stats = self.collect(problems, seed)
        t1 = time.perf_counter()
        metrics = {f"train/{k}": v for k, v in batch.metrics().items()}
        metrics.update({f"train/{k}": v for k, v in stats.items()})
        metrics.update({f"train/{k}": v for k, v in self.update(batch).items()})
        metrics["time/rollout_s"], metrics["time/update_s"] = t1 - t0, time.perf_counter() - t1
        return metrics, batch


class ProblemOrder:
    """Problem indices in a seeded random order (a new permutation each pass over `size`
    problems, or 0, 1, 2, ... when `size` is None); `position` counts the indices handed out, so
    that a resumed run continues where it stopped."""

    def __init__(self, size: int | None, seed: int = 0, position: int = 0):
        self.size, self.seed, self.position = size, seed, position
        self._epoch, self._order = -1, None

    def __iter__(self):
        return self

    def __next__(self) -> int:
        i, self.position = self.position, self.position + 1
        if self.size is None:
            return i
        epoch, offset = divmod(i, self.size)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng((self.seed, epoch)).permutation(self.size)
        return int(self._order[offset])


@contextlib.contextmanager
def one_line_errors(debug: bool = False):
    """Turn a bad input (ValueError, FileNotFoundError, NotImplementedError raised inside) into
    one line on stderr and exit code 2; with `debug`, the exception propagates."""
    try:
        yield
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"{first} (--debug shows where)")


def exit_cleanly_when_offline(run, hint: str):
    """Run `run()`; a hub that cannot be reached ends the program in one line naming `hint`."""
    from envs.problems import HubUnavailableError as DataOffline
    from learners.params import HubUnavailableError as ModelOffline

    try:
        return run()
    except (DataOffline, ModelOffline) as exc:
        print(f"error: {str(exc).split('. Offline')[0]}; {hint}", file=sys.stderr)
        raise SystemExit(2) from None
