"""A GRPO run from its config: the run directory, the model, the sampler, the loop, checkpoints,
evaluation and the exported adapter.

    summary = train(Config(steps=50, out="runs/x"))   # what experiments/aime_grpo.py calls

A run directory holds one run (toolgrpo.agents.training.rundir): config.json, metrics.jsonl, the plots,
transcripts/, checkpoints/ (orbax) with checkpoint_adapters/STEP (PEFT) beside, adapter/ (the
final one, PEFT), summary.json. `train` raises, never exits (toolgrpo.agents.training.errors): bad input
(InputError) before anything is written; SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop)
finishes the update in flight (a wait for a batch or an evaluation is cut short), saves a
checkpoint and its adapter and raises Interrupted; grpo.max_skipped_updates non-finite updates
in a row stop the run without saving them (NonFiniteUpdates); rollout servers that fail and do
not come back (RolloutsDown) stop it with the checkpoint of the last step trained and its
adapter; a full disk raises DiskFull. `resume` continues from the latest checkpoint with the
first problem no step trained on: bitwise where the machine is the same and max_staleness is 0
(pipelined, the resumed run's next batch is sampled by the checkpoint's adapter, where the
uninterrupted run's was sampled by the one before). What it reports goes to this module's
logger (the entry points print it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil

from toolgrpo.agents.training.build import build_learner, choose_engine, open_sampler
from toolgrpo.agents.training.checks import bad_input, check_inputs
from toolgrpo.agents.training.config import Config
from toolgrpo.agents.training.errors import ConfigError, Interrupted, disk_full_as_error
from toolgrpo.agents.training.fit import agree, fit
from toolgrpo.agents.training.health import HealthMonitor
from toolgrpo.agents.training.hooks import Evaluation, Hook, StepDone, transcripts
from toolgrpo.agents.training.loop import (
    GRPOLoop,
    NonFiniteUpdates,
    ProblemOrder,
    RolloutsDown,
    sampler_copy,
)
from toolgrpo.agents.training.rundir import (
    check_same_problems,
    finished_summary,
    prepare_run_directory,
    record_problems,
    results_line,
    run_inputs,
)
from toolgrpo.agents.training.runlog import RunLog, run_environment, truncate_metrics
from toolgrpo.agents.training.signals import StepAbandoned, StopSignals

logger = logging.getLogger(__name__)


def train(cfg: Config) -> dict:
    """The whole run of `cfg` (module docstring); returns the summary it writes to
    OUT/summary.json. Raises toolgrpo.agents.training.errors' exceptions: bad input (InputError,
    ConfigError, HubUnreachable) before the model loads and before anything is written.

    Across processes (cfg.dist: jax.distributed), every process runs this with the same config
    and OUT (a shared file system): the state is sharded over the mesh of all their devices,
    process 0 alone plays the rollouts (its batches sent to the others), evaluates and writes
    logs, transcripts and adapters; the orbax checkpoints are written by all (each its
    shards)."""
    if cfg.sampler.engine != "jax" and not cfg.sampler.vllm_url:  # leave vLLM its GPU share
        os.environ.setdefault(
            "XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.92 - cfg.sampler.vllm_gpu_memory:.2f}"
        )
    from toolgrpo.agents.training.distributed import initialize, is_main
    from toolgrpo.learners.devices import enable_compilation_cache, unused_accelerator
    from toolgrpo.learners.sharding import shard_state

    # 1. every input checked, then the run directory: nothing is written before
    with bad_input():
        mesh = initialize(cfg.dist)  # before jax is used for anything else
    main = is_main()
    unused = None if cfg.allow_cpu else unused_accelerator()
    if unused:
        raise ConfigError(unused)
    engine = choose_engine(cfg)
    with bad_input():
        tokenizer, n_train, n_eval = check_inputs(cfg, engine)
        if main:
            prepare_run_directory(cfg.out, cfg, cfg.resume, cfg.overwrite, inputs=run_inputs(cfg))
            check_same_problems(cfg)
    barrier("run directory")
    finished = finished_summary(cfg) if cfg.resume and main else None
    if cfg.resume and agree(finished is not None):  # a finished run: nothing to train
        if main:
            logger.info(
                "the run in %s has trained its %d steps; nothing to do (raise --steps to train "
                "further). %s",
                cfg.out,
                cfg.steps,
                results_line(cfg.out),
            )
        return finished or {}

    # 2. the model and its state, over the mesh's devices when there are several
    enable_compilation_cache()  # a rerun or a resume loads the step's programs
    with bad_input():  # weights that are not finite, shapes that differ
        model, grpo_cfg, state = build_learner(cfg)
    if main:
        record_problems(cfg)
    if mesh.devices.size > 1:
        state = shard_state(state, mesh)

    # 3. the steps, their checkpoints and evaluations, and the final adapter
    with disk_full_as_error():
        metrics, last_eval = _run_steps(
            cfg, engine, tokenizer, model, grpo_cfg, state, mesh, n_train, n_eval
        )
    summary = {
        "step": cfg.steps,
        **last_eval,
        **{k: v for k, v in metrics.items() if k.startswith("train/")},
        "adapter": os.path.join(cfg.out, "adapter"),
        "sampler": engine,
        "seed": cfg.seed,
        "environment": run_environment(),
    }
    barrier("end of run")  # every process's checkpoint is written before any exits
    if not main:
        return summary
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info(json.dumps({k: summary[k] for k in summary if k.startswith("eval/pass@")}))
    logger.info(results_line(cfg.out))
    return summary


def _run_steps(cfg: Config, engine, tokenizer, model, grpo_cfg, state, mesh, n_train, n_eval):
    """The steps of `train` from a loaded model: (the last step's metrics, the last
    evaluation's). Opens the sampler and the rollouts, restores a checkpoint on resume, and
    saves the adapter however the steps end."""
    from toolgrpo.agents.training.distributed import is_main
    from toolgrpo.learners.checkpoint import Checkpointer

    main = is_main()
    # a pipelined sampler reads its own copy of the adapter while the learner updates the model
    sampler_model = sampler_copy(model) if cfg.max_staleness else model
    with contextlib.ExitStack() as stack:
        # a stop signal from here on ends the run after a checkpoint; one during the setup
        # (the sampler's start, the restore) is acted on when the first step begins; it stays
        # in force until everything below is closed
        signals = stack.enter_context(StopSignals(abandon=jax_processes() == 1))
        train_rollouts, eval_rollouts = (
            _open_rollouts(stack, cfg, engine, sampler_model, tokenizer) if main else (None, None)
        )
        loop = GRPOLoop(
            model=model,
            state=state,
            cfg=grpo_cfg,
            rollouts=train_rollouts,
            problems_per_step=cfg.problems_per_step,
            dynamic_sampling=cfg.dynamic_sampling,
            max_refills=cfg.max_refills,
            max_staleness=cfg.max_staleness,
            sampler_model=sampler_model,
            mesh=mesh if mesh.devices.size > 1 else None,
            max_replays=cfg.sampler.max_replays,
        )
        ckpt = Checkpointer(
            os.path.join(cfg.out, "checkpoints"),
            keep=cfg.log.keep_checkpoints,
            every=cfg.log.checkpoint_every,
        )
        start, position = _resume(cfg, ckpt, loop, main)
        log = _open_log(cfg, main)
        stack.push(_closer(log))
        ks = sorted({1, cfg.eval.samples} | ({8} if cfg.eval.samples >= 8 else set()))
        evaluation = (
            Evaluation(
                eval_rollouts, range(n_eval), log, ks=ks, seed=cfg.seed, stride=99, loop=loop
            )
            if eval_rollouts is not None
            else None
        )

        def evaluate_at(step: int, done: StepDone | None = None) -> dict:
            return evaluation(step) if evaluation is not None else {}

        hooks = [
            transcripts(log, every=cfg.log.transcripts_every),
            checkpoint_hook(cfg, ckpt, loop, model, main),
            Hook(evaluate_at, every=cfg.eval.every, samples=True),
        ]
        save_adapter = functools.partial(_save_adapter, cfg, model, main)
        with _stops_reported(cfg, ckpt, save_adapter):
            metrics = fit(
                loop,
                ProblemOrder(n_train, seed=cfg.seed, position=position),
                log,
                start=start,
                steps=cfg.steps,
                seed=cfg.seed,
                hooks=hooks,
                signals=signals,
                health=HealthMonitor(cfg.health, group_size=cfg.rollout.group_size),
            )
            with signals.abandoning():  # a stop signal ends the last evaluation at once
                last_eval = evaluate_at(cfg.steps)
        save_adapter()
        if main and cfg.log.export_merged:
            _export_merged(cfg, model, tokenizer)
    return metrics, last_eval


def _open_rollouts(stack: contextlib.ExitStack, cfg: Config, engine, sampler_model, tokenizer):
    """Process 0's sampler and its two Rollouts, (training, evaluation), closed with `stack`."""
    import gymnasium as gym

    from toolgrpo.agents.rollout import Rollouts

    sampler = stack.enter_context(open_sampler(cfg, engine, sampler_model, tokenizer))

    def rollouts(split: str, rollout_cfg):
        make_env = lambda: gym.make(cfg.env.env_id, **cfg.env.env_kwargs(split))
        return stack.enter_context(Rollouts(make_env, sampler, tokenizer, rollout_cfg))

    evaluation_cfg = dataclasses.replace(cfg.rollout, group_size=cfg.eval.samples)
    return rollouts("train", cfg.rollout), rollouts("test", evaluation_cfg)


def _resume(cfg: Config, ckpt, loop: GRPOLoop, main: bool) -> tuple[int, int]:
    """(the first step, the problem order's position): the latest checkpoint's on resume, into
    `loop`, with the metrics logged after it dropped; (0, 0) for a new run."""
    start, position = 0, 0
    if cfg.resume and ckpt.latest_step is not None:
        start = ckpt.latest_step
        state, meta, _ = ckpt.restore(loop.state)
        position = int(meta.get("data_position", 0))
        loop.restore(state, data_position=position)
        logger.info("resumed from step %d in %s", start, ckpt.directory)
    elif cfg.resume:
        logger.info("--resume: no checkpoint in %s; starting a new run", ckpt.directory)
    if main:
        dropped = truncate_metrics(os.path.join(cfg.out, "metrics.jsonl"), start)
        if dropped:
            logger.info(
                "metrics.jsonl: dropped %d records logged after step %d (they are logged again)",
                dropped,
                start,
            )
    return start, position


def _open_log(cfg: Config, main: bool):
    """Process 0's RunLog (metrics.jsonl, plots, W&B, transcripts); the others' write nothing."""
    if not main:
        return SilentLog()
    wandb_mode = "online" if cfg.log.wandb else "off"
    return RunLog(
        cfg.out, cfg, wandb_mode=wandb_mode, project=cfg.log.wandb_project, resume=cfg.resume
    )


@contextlib.contextmanager
def _stops_reported(cfg: Config, ckpt, save_adapter):
    """The ends of the steps other than their last, as what `train` raises: a stop signal (in a
    step, or in the last evaluation: StepAbandoned) and servers that stay down save the adapter
    and say where the checkpoint is; non-finite updates name the last finite checkpoint."""
    adapter_dir = os.path.join(cfg.out, "adapter")
    try:
        yield
    except (Interrupted, StepAbandoned) as stop:
        step = stop.step if isinstance(stop, Interrupted) else cfg.steps
        save_adapter()
        raise Interrupted(
            step,
            stop.signum,
            f"saved checkpoint {step} in {ckpt.directory} and its adapter in "
            f"{adapter_dir}; continue with --resume",
        ) from None
    except NonFiniteUpdates as diverged:
        diverged.checkpoint = ckpt.latest_step
        raise
    except RolloutsDown as down:
        save_adapter()
        saved = (
            f"the checkpoint of step {down.step} is in {ckpt.directory}"
            if down.step in ckpt.steps
            else f"no step was trained (checkpoints: {ckpt.directory})"
        )
        raise RolloutsDown(
            f"{down}; {saved}, the adapter in {adapter_dir}; continue with --resume", down.step
        ) from down


def _save_adapter(cfg: Config, model, main: bool) -> None:
    """OUT/adapter, the model's LoRA as a PEFT adapter (process 0)."""
    from toolgrpo.learners.lora import save_peft_adapter

    if main:
        adapter_dir = os.path.join(cfg.out, "adapter")
        save_peft_adapter(model, adapter_dir, base_model_name_or_path=cfg.model.name)


def _export_merged(cfg: Config, model, tokenizer) -> None:
    """OUT/merged: the base with the LoRA merged in, a plain Hugging Face model."""
    from flax import nnx

    from toolgrpo.learners.lora import merge_lora
    from toolgrpo.learners.params import save_pretrained

    merged = os.path.join(cfg.out, "merged")
    save_pretrained(merge_lora(nnx.clone(model)), merged)
    tokenizer.save_pretrained(merged)


def _closer(log):
    """An exit callback that closes `log`; when the run is already failing (a full disk, most
    likely), a failure to close is dropped so that the run's own error is the one reported."""

    def close(kind, exc, tb) -> bool:
        try:
            log.close()
        except OSError:
            if exc is None:
                raise
        return False

    return close


def checkpoint_hook(cfg: Config, ckpt, loop: GRPOLoop, model, main: bool) -> Hook:
    """Every cfg.log.checkpoint_every steps and when the steps end: the orbax checkpoint (every
    process, each its shards) and, from process 0, its PEFT adapter in
    OUT/checkpoint_adapters/STEP (evaluate.py --adapter loads it); the adapters of checkpoints
    no longer kept are removed."""
    from toolgrpo.learners.lora import save_peft_adapter

    adapters = os.path.join(cfg.out, "checkpoint_adapters")

    def save(step: int, done: StepDone) -> None:
        meta = {"data_position": loop.data_position, "adapter_version": loop.adapter_version}
        ckpt.save(step, loop.state, meta)
        if not main:
            return
        directory = os.path.join(adapters, str(step))
        if not os.path.isdir(directory):
            try:
                save_peft_adapter(model, directory, base_model_name_or_path=cfg.model.name)
            except OSError:  # a full disk: no half-written adapter is left
                shutil.rmtree(directory, ignore_errors=True)
                raise
        for name in os.listdir(adapters):
            if name.isdigit() and int(name) not in ckpt.steps:
                shutil.rmtree(os.path.join(adapters, name))

    return Hook(save, every=cfg.log.checkpoint_every, at_exit=True)


def jax_processes() -> int:
    import jax

    return jax.process_count()


def barrier(name: str) -> None:
    """Every process waits here for the others (nothing with a single process)."""
    if jax_processes() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class SilentLog:
    """The RunLog of the processes that do not write (all but process 0 of several)."""

    def log(self, step, metrics) -> None:
        pass

    def transcripts(self, step, texts, tag="train") -> None:
        pass

    def close(self) -> None:
        pass
