"""A GRPO run from its config: the run directory, the model, the sampler, the loop, checkpoints,
evaluation and the exported adapter.

    summary = train(Config(steps=50, out="runs/x"))   # what experiments/aime_grpo.py calls
    fit(loop, problems, log, start=0, steps=20, seed=0)   # just the steps (the offline demo)

A run directory holds one run: config.json, metrics.jsonl, the plots, transcripts/,
checkpoints/ (orbax) with checkpoint_adapters/STEP (PEFT) beside, adapter/ (the final one, PEFT),
summary.json. SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop) finishes the update in flight (a
wait for a batch or an evaluation is cut short), saves a checkpoint and its adapter and exits
with 130 or 143 (StopSignals); non-finite updates are skipped, and grpo.max_skipped_updates of
them in a row stop the run without saving them (NonFiniteUpdates); rollout servers that fail
and do not come back (RolloutsDown) stop it with the checkpoint of the last step trained and
its adapter; `resume` continues from the latest checkpoint with the first problem no step
trained on: bitwise where the machine is the same and max_staleness is 0 (pipelined, the
resumed run's next batch is sampled by the checkpoint's adapter, where the uninterrupted run's
was sampled by the one before).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from typing import Self

import numpy as np

from agents.rollout import RolloutConfig
from agents.training.cli import fail, one_line_errors
from agents.training.config import RESUMABLE_CHANGES, Config, flatten
from agents.training.evaluation import evaluate
from agents.training.loop import (
    GRPOLoop,
    NonFiniteUpdates,
    ProblemOrder,
    RolloutsDown,
    sampler_copy,
)
from agents.training.runlog import RunLog, StepLog, run_environment, truncate_metrics

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Ctrl-C, and the stop of SLURM, Kubernetes and preemptible VMs: either ends a run after a
checkpoint (StopSignals)."""


class Interrupted(Exception):
    """A stop signal (`signum`) ended `fit` after `step` (its checkpoint, if any, saved)."""

    def __init__(self, step: int, signum: int = signal.SIGINT):
        super().__init__(f"interrupted after step {step}")
        self.step, self.signum = step, signum

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + self.signum


class StepAbandoned(BaseException):
    """A stop signal cut short a block that leaves nothing half-done (StopSignals.abandoning).
    A BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way takes
    it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT and SIGTERM as a request to stop after a checkpoint. The first signal is recorded
    (`signum`); inside an `abandoning()` block (a wait for a batch, an evaluation) it also
    raises StepAbandoned there, at once. Everywhere else, an update and a checkpoint's write
    included, a signal, and any repeat of it (`uv run` forwards a signal a second time), is only
    recorded: nothing is cut short half-written. With `abandon` False nothing is cut short (the
    processes of a multi-process learner stop after the same step). With `linger`, after a stop
    the signals stay ignored on exit (the process is ending: a late repeat must not end it
    before it has)."""

    def __init__(self, abandon: bool = True, linger: bool = False):
        self.abandon, self.linger = abandon, linger
        self.signum: int | None = None
        self._abandonable = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> Self:
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_IGN if self.linger and self.requested else previous)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            message = (
                f"\n{name}: stopping: an update in flight is finished, a wait for a batch or "
                "an evaluation is cut short; then a checkpoint and the adapter are saved\n"
            )
        else:
            message = f"\n{name}: already stopping (the checkpoint is saved before the exit)\n"
        os.write(2, message.encode())  # not print: the main thread may be inside a print
        if self._abandonable:
            self._abandonable = False
            raise StepAbandoned(self.signum)

    @contextlib.contextmanager
    def abandoning(self):
        """A block that a stop signal ends at once (StepAbandoned), one that came before it
        included: it must leave nothing half-written."""
        if not self.abandon:
            yield
            return
        if self.signum is not None:  # a signal came before the block
            raise StepAbandoned(self.signum)
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False


def fit(
    loop: GRPOLoop,
    problems: ProblemOrder,
    log: StepLog,
    *,
    start: int,
    steps: int,
    seed: int,
    checkpoint: Callable[[int, bool], object] | None = None,
    evaluate_at: Callable[[int], object] | None = None,
    eval_every: int = 0,
    transcripts_every: int = 10,
    signals: StopSignals | None = None,
) -> dict:
    """Steps start+1 .. steps of `loop`, each logged; `checkpoint(step, force)` after each (it
    decides whether one is due), `evaluate_at(step)` every `eval_every` steps before the last.
    Step t samples with seed `seed * 1_000_003 + t`. Batches come from a RolloutPipeline, up to
    loop.max_staleness steps ahead (0: the synchronous loop); evaluations pause it. Returns the
    last step's metrics.

    A stop signal (`signals`, or StopSignals of its own) raises Interrupted once a step is
    logged and checkpointed (forced): the step whose update is in flight, or, when it comes
    while the learner waits for a batch or evaluates, the last one done (the batch is dropped:
    a resumed run collects it again). grpo.max_skipped_updates non-finite updates in a row
    raise NonFiniteUpdates once the last is logged, before any checkpoint of it. Rollout servers
    that are down raise RolloutsDown, with the last step trained checkpointed (forced) and
    named in its `step`."""
    import time

    import jax
    from tqdm import tqdm

    from agents.training.pipeline import RolloutPipeline

    metrics: dict = {}
    bar = tqdm(
        range(start + 1, steps + 1), desc="GRPO", initial=start, total=steps, dynamic_ncols=True
    )
    done = start  # the last step logged and checkpointed (when due)
    with contextlib.ExitStack() as stack:
        interrupt = signals or stack.enter_context(StopSignals(jax.process_count() == 1))
        try:
            with RolloutPipeline(
                loop, problems, lambda step: seed * 1_000_003 + step, start + 1, steps
            ) as rollouts:
                for step in bar:
                    t0 = time.perf_counter()
                    try:
                        with interrupt.abandoning():
                            collected = rollouts.get(step)
                    except RolloutsDown as down:
                        down.step = done
                        if checkpoint is not None and done > start:
                            checkpoint(done, True)
                        raise
                    metrics, batch = loop.learn(collected, waited_s=time.perf_counter() - t0)
                    rollouts.publish()
                    # read once: a signal that arrives later in this step is acted on after the
                    # next; across processes, process 0's (so that all stop after the same step)
                    stop = agree(interrupt.requested)
                    log.log(step, metrics)
                    if loop.skipped_in_a_row >= loop.cfg.max_skipped_updates:
                        raise NonFiniteUpdates(step, loop.skipped_in_a_row)
                    if transcripts_every and step % transcripts_every == 1 % transcripts_every:
                        log.transcripts(step, batch.transcripts[:4])
                    if checkpoint is not None:
                        checkpoint(step, stop)
                    done = step
                    due = evaluate_at and eval_every and step % eval_every == 0 and step < steps
                    if due and not stop:
                        with interrupt.abandoning(), rollouts.paused():
                            evaluate_at(step)
                    bar.set_postfix(
                        reward=f"{metrics.get('train/reward', 0):.3f}",
                        acc=f"{metrics.get('train/accuracy', 0):.3f}",
                        tools=f"{metrics.get('train/tool_use_rate', 0):.2f}",
                    )
                    if stop:  # process 0's signal: this process may have had none
                        raise Interrupted(step, interrupt.signum or signal.SIGTERM)
        except StepAbandoned as abandoned:
            if checkpoint is not None:
                checkpoint(done, True)
            raise Interrupted(done, abandoned.signum) from None
    bar.close()
    return metrics


def agree(flag: bool) -> bool:
    """Process 0's `flag` in every process (a collective); `flag` itself in a single one."""
    import jax

    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def config_changes(saved: dict, config: dict, allowed=RESUMABLE_CHANGES) -> list[str]:
    """'setting: old -> new' for every setting of `config` (nested as dataclasses.asdict gives
    it) whose saved value differs, but for the `allowed` settings and sections."""
    old, new = flatten(saved), flatten(json.loads(json.dumps(config, default=str)))
    changes = []
    for key, value in new.items():
        if key.split(".")[0] in allowed or key in allowed or key not in old:
            continue
        if old[key] != value:
            changes.append(f"{key}: {old[key]!r} -> {value!r}")
    return changes


RUN_MARKER = "config.json"
"""The file every run directory holds from its start (RunLog writes it): the settings of the
run, which mark a directory as one that --overwrite may replace."""


def is_run_directory(path: str) -> bool:
    """Whether `path` holds a run of this project: its RUN_MARKER, the settings of a run."""
    try:
        with open(os.path.join(path, RUN_MARKER)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"out", "seed"} <= saved.keys()


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def prepare_run_directory(
    out: str, config, resume: bool, overwrite: bool, inputs: tuple[str, ...] = ()
) -> None:
    """A run directory holds one run. A new run needs an empty (or missing) `out`, or
    `overwrite` of a run directory (is_run_directory) that neither holds one of the run's
    `inputs` (model, problems, config file) nor the current directory; `resume` needs the saved
    config to agree with `config` but for RESUMABLE_CHANGES. Otherwise a ValueError says why;
    nothing is deleted but a run. Makes `out`."""
    if not out.strip():
        raise ValueError("--out is empty: name the run directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a directory: choose another --out")
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    present = sorted(os.listdir(out)) if os.path.isdir(out) else []
    shown = f"{', '.join(present[:4])}{', ...' if len(present) > 4 else ''}"
    if resume:
        saved_path = os.path.join(out, RUN_MARKER)
        if os.path.exists(saved_path):
            with open(saved_path) as f:
                saved = json.load(f)
            changes = config_changes(saved, cfg)
            if changes:
                raise ValueError(
                    f"--resume with settings that differ from the run in {out}: "
                    f"{'; '.join(changes)} (resume with the saved settings, or start a new run "
                    f"with another --out)"
                )
        elif present:
            raise ValueError(f"--resume: {out} holds no run ({shown}); choose its run directory")
    elif present and not is_run_directory(out):
        raise ValueError(
            f"{out} is not empty and holds no run of this project ({shown}): choose another "
            "--out (--overwrite replaces only a run directory)"
        )
    elif present and not overwrite:
        raise ValueError(
            f"{out} already holds a run ({shown}); continue it with --resume, replace it "
            f"with --overwrite, or choose another --out"
        )
    elif present:
        held = [p for p in inputs if p and os.path.exists(p) and _inside(p, out)]
        if _inside(os.getcwd(), out):
            held.insert(0, "the current directory")
        if held:
            raise ValueError(
                f"--overwrite of {out} would delete {', '.join(held)}: choose another --out"
            )
        shutil.rmtree(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot make the directory ({exc.strerror})") from None


def run_inputs(cfg: Config) -> tuple[str, ...]:
    """The local paths a run of `cfg` reads: the model directory, the problems files, the
    config file."""
    paths = (cfg.model.name, cfg.env.problems, cfg.env.eval_problems, cfg.config_file)
    return tuple(p for p in paths if p and os.path.exists(p))


def choose_engine(cfg: Config) -> str:
    """ "vllm" or "jax": the configured engine, or for "auto" vLLM where it is installed and a GPU
    is present (or a server URL is given)."""
    if cfg.sampler.engine != "auto":
        return cfg.sampler.engine
    if cfg.sampler.vllm_url:
        return "vllm"
    import importlib.util

    import jax

    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    return "vllm" if has_gpu and importlib.util.find_spec("vllm") else "jax"


def check_context_budget(env, tokenizer, indices, rollout: RolloutConfig) -> None:
    """A prompt that fills rollout.max_total_tokens leaves nothing to sample: refuse such a
    budget (and warn when the first turn gets less than its max_turn_tokens)."""
    from agents.rollout import longest_prompt

    budget, turn = rollout.max_total_tokens, rollout.max_turn_tokens
    tokens, problem_id = longest_prompt(env, tokenizer, indices)
    if tokens >= budget:
        raise ValueError(
            f"--rollout.max-total-tokens {budget} leaves no room to answer: the prompt of "
            f"{problem_id} is {tokens} tokens; raise it above {tokens} (to {tokens + turn} for "
            "one full turn)"
        )
    if tokens + turn > budget:
        print(
            f"warning: the prompt of {problem_id} is {tokens} tokens, so its first turn gets "
            f"{budget - tokens} of --rollout.max-turn-tokens {turn}",
            file=sys.stderr,
            flush=True,
        )


def build_learner(cfg: Config):
    """(model with LoRA, GRPOConfig, a fresh TrainState): what a checkpoint of `cfg` restores
    into."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from learners.lora import apply_lora
    from learners.params import from_pretrained
    from learners.train import init_state

    dtype = getattr(jnp, cfg.model.compute_dtype(jax.default_backend()))
    model = from_pretrained(
        cfg.model.name,
        dtype=dtype,
        param_dtype=dtype,
        remat=cfg.model.remat,
        attention=cfg.model.attention,
        attention_block=cfg.model.attention_block,
    )
    model = apply_lora(
        model, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha, rngs=nnx.Rngs(cfg.seed)
    )
    grpo_cfg = cfg.grpo_for_run()
    return model, grpo_cfg, init_state(model, grpo_cfg)


def check_inputs(cfg: Config, engine: str):
    """Everything a run reads, checked before the model loads (agents.training.checks: a
    ValueError or FileNotFoundError otherwise): the model's config and weight files, the
    tokenizer, the rollout engine, the environment and both problem sets, the context budget.
    Returns (the tokenizer, training problems, evaluation problems)."""
    import gymnasium as gym

    import envs
    from agents.training.checks import (
        check_context_length,
        check_model,
        check_sampler,
        check_tokenizer,
    )
    from envs.toolmath import unwrapped_toolmath
    from learners.params import resolve

    model_config = check_model(resolve(cfg.model.name))
    tokenizer = check_tokenizer(cfg.model.name, model_config)
    check_context_length(model_config, cfg.rollout.max_total_tokens)
    check_sampler(cfg.sampler.vllm_url, engine)
    if cfg.env.env_id not in envs.ENV_IDS:
        raise ValueError(f"--env.env-id {cfg.env.env_id!r} is not one of {', '.join(envs.ENV_IDS)}")
    sizes = []
    for split in ("train", "test"):
        probe = gym.make(cfg.env.env_id, **cfg.env.env_kwargs(split))  # loads the problems now
        sizes.append(len(unwrapped_toolmath(probe).problems))
        check_context_budget(probe, tokenizer, range(min(sizes[-1], 4096)), cfg.rollout)
        probe.close()
    if cfg.problems_per_step > sizes[0]:
        raise ValueError(
            f"--problems-per-step {cfg.problems_per_step} is more than the {sizes[0]} training "
            "problems"
        )
    return tokenizer, sizes[0], min(sizes[1], cfg.eval.limit or 10**9)


@contextlib.contextmanager
def open_sampler(cfg: Config, engine: str, model, tokenizer):
    """The rollout engine of `cfg`: a vLLM server (given, or launched here and stopped on exit)
    or the in-process JAX sampler."""
    with contextlib.ExitStack() as stack:
        if engine == "vllm":
            from agents.vllm_client import VLLMSampler, VLLMServer
            from agents.vllm_pool import VLLMPool

            server = None
            urls = tuple(cfg.sampler.vllm_url)
            if not urls:  # launched here: restarted if it dies
                server = stack.enter_context(
                    VLLMServer(
                        cfg.model.name,
                        max_lora_rank=cfg.model.lora_rank,
                        gpu_memory_utilization=cfg.sampler.vllm_gpu_memory,
                        extra_args=["--max-model-len", str(cfg.rollout.max_total_tokens)],
                    )
                )
                urls = (server.url,)
            print(
                f"rollouts: vLLM server{'s' if len(urls) > 1 else ''} at {', '.join(urls)}",
                flush=True,
            )
            adapters = os.path.join(cfg.out, "adapters")
            clients = [
                VLLMSampler(
                    url,
                    tokenizer,
                    adapter_dir=adapters,
                    server=server,
                    recover_s=cfg.sampler.recover_s,
                )
                for url in urls
            ]
            yield clients[0] if len(clients) == 1 else VLLMPool(clients, adapter_dir=adapters)
        else:
            import jax

            from agents.sampler import JaxSampler

            eos = [t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None]
            print(
                f"rollouts: in-process JAX sampler on {jax.devices()[0].platform}"
                + (
                    ""
                    if cfg.sampler.engine == "jax"
                    else " (vLLM needs a GPU and `pip install toolgrpo[vllm]`)"
                ),
                flush=True,
            )
            yield JaxSampler(model, tokenizer, eos_token_ids=eos)


def train(cfg: Config) -> dict:
    """The whole run of `cfg` (module docstring); returns the summary it writes to
    OUT/summary.json. Bad input ends it with one line (exit code 2) before the model loads.

    Across processes (cfg.dist: jax.distributed), every process runs this with the same config
    and OUT (a shared file system): the state is sharded over the mesh of all their devices,
    process 0 alone plays the rollouts (its batches sent to the others), evaluates and writes
    logs, transcripts and adapters; the orbax checkpoints are written by all (each its
    shards)."""
    if cfg.sampler.engine != "jax" and not cfg.sampler.vllm_url:  # leave vLLM its GPU share
        os.environ.setdefault(
            "XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.92 - cfg.sampler.vllm_gpu_memory:.2f}"
        )
    import gymnasium as gym
    from flax import nnx

    from agents.rollout import Rollouts
    from agents.training.distributed import initialize, is_main
    from learners.checkpoint import Checkpointer
    from learners.devices import enable_compilation_cache, unused_accelerator
    from learners.lora import merge_lora, save_peft_adapter
    from learners.params import save_pretrained
    from learners.sharding import shard_state

    with one_line_errors(debug=cfg.debug):
        mesh = initialize(cfg.dist)  # before jax is used for anything else
    main, several = is_main(), mesh.devices.size > 1
    unused = None if cfg.allow_cpu else unused_accelerator()
    if unused:
        fail(unused)
    engine = choose_engine(cfg)
    with one_line_errors(debug=cfg.debug):  # nothing is written before the inputs are checked
        tokenizer, n_train, n_eval = check_inputs(cfg, engine)
        if main:
            prepare_run_directory(cfg.out, cfg, cfg.resume, cfg.overwrite, inputs=run_inputs(cfg))
            check_same_problems(cfg)
    barrier("run directory")
    finished = finished_summary(cfg) if cfg.resume and main else None
    if cfg.resume and agree(finished is not None):  # a finished run: nothing to train
        if main:
            print(
                f"the run in {cfg.out} has trained its {cfg.steps} steps; nothing to do (raise "
                f"--steps to train further). {results_line(cfg.out)}",
                flush=True,
            )
        return finished or {}
    enable_compilation_cache()  # a rerun or a resume loads the step's programs
    with one_line_errors(debug=cfg.debug):  # weights that are not finite, shapes that differ
        model, grpo_cfg, state = build_learner(cfg)
    if main:
        record_problems(cfg)
    if several:  # parameters and optimizer state over the mesh's devices
        state = shard_state(state, mesh)

    # a pipelined sampler reads its own copy of the adapter while the learner updates the model
    sampler_model = sampler_copy(model) if cfg.max_staleness else model
    with contextlib.ExitStack() as stack:
        # a stop signal from here on ends the run after a checkpoint; one during the setup
        # (the sampler's start, the restore) is acted on when the first step begins; it stays
        # in force until everything below is closed
        signals = stack.enter_context(StopSignals(abandon=jax_processes() == 1, linger=True))
        train_rollouts = evaluator = None
        if main:
            sampler = stack.enter_context(open_sampler(cfg, engine, sampler_model, tokenizer))
            train_rollouts = stack.enter_context(
                Rollouts(
                    lambda: gym.make(cfg.env.env_id, **cfg.env.env_kwargs("train")),
                    sampler,
                    tokenizer,
                    cfg.rollout,
                )
            )
            evaluator = stack.enter_context(
                Rollouts(
                    lambda: gym.make(cfg.env.env_id, **cfg.env.env_kwargs("test")),
                    sampler,
                    tokenizer,
                    dataclasses.replace(cfg.rollout, group_size=cfg.eval.samples),
                )
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
            mesh=mesh if several else None,
            max_replays=cfg.sampler.max_replays,
        )
        ckpt = Checkpointer(
            os.path.join(cfg.out, "checkpoints"),
            keep=cfg.log.keep_checkpoints,
            every=cfg.log.checkpoint_every,
        )
        start, position = 0, 0
        if cfg.resume and ckpt.latest_step is not None:
            start = ckpt.latest_step
            state, meta, _ = ckpt.restore(loop.state)
            position = int(meta.get("data_position", 0))
            loop.restore(state, data_position=position)
            print(f"resumed from step {start} in {ckpt.directory}", flush=True)
        elif cfg.resume:
            print(f"--resume: no checkpoint in {ckpt.directory}; starting a new run", flush=True)
        if main:
            dropped = truncate_metrics(os.path.join(cfg.out, "metrics.jsonl"), start)
            if dropped:
                print(
                    f"metrics.jsonl: dropped {dropped} records logged after step {start} "
                    "(they are logged again)",
                    flush=True,
                )
        log = (
            RunLog(
                cfg.out,
                cfg,
                wandb_mode="online" if cfg.log.wandb else "off",
                project=cfg.log.wandb_project,
                resume=cfg.resume,
            )
            if main
            else SilentLog()
        )
        problems = ProblemOrder(n_train, seed=cfg.seed, position=position)
        ks = sorted({1, cfg.eval.samples} | ({8} if cfg.eval.samples >= 8 else set()))

        def evaluate_at(step: int) -> dict:
            if not main:
                return {}
            assert evaluator is not None  # the main process made it
            loop.sync_sampler()  # the learner's latest adapter (a no-op when it has it)
            with signals.abandoning():  # a stop signal ends it at once
                metrics, transcripts = evaluate(
                    evaluator,
                    range(n_eval),
                    ks=ks,
                    seed=cfg.seed + 99 * step,
                    adapter_version=loop.adapter_version,
                )
            metrics = {f"eval/{k}": v for k, v in metrics.items()}
            log.log(step, metrics)
            log.transcripts(step, transcripts, tag="eval")
            return metrics

        adapters_of_checkpoints = os.path.join(cfg.out, "checkpoint_adapters")

        def checkpoint(step: int, force: bool = False) -> None:
            """The orbax checkpoint of `step` when due (every process, each its shards), and
            its PEFT adapter (evaluate.py --adapter loads it); adapters of checkpoints no longer
            kept are removed."""
            meta = {"data_position": loop.data_position, "adapter_version": loop.adapter_version}
            if not ckpt.maybe_save(step, loop.state, meta, force=force) or not main:
                return
            directory = os.path.join(adapters_of_checkpoints, str(step))
            if not os.path.isdir(directory):
                try:
                    save_peft_adapter(model, directory, base_model_name_or_path=cfg.model.name)
                except OSError:  # a full disk: no half-written adapter is left
                    shutil.rmtree(directory, ignore_errors=True)
                    raise
            for name in os.listdir(adapters_of_checkpoints):
                if name.isdigit() and int(name) not in ckpt.steps:
                    shutil.rmtree(os.path.join(adapters_of_checkpoints, name))

        adapter_dir = os.path.join(cfg.out, "adapter")
        try:
            metrics = fit(
                loop,
                problems,
                log,
                start=start,
                steps=cfg.steps,
                seed=cfg.seed,
                checkpoint=checkpoint,
                evaluate_at=evaluate_at,
                eval_every=cfg.eval.every,
                transcripts_every=cfg.log.transcripts_every,
                signals=signals,
            )
            checkpoint(cfg.steps, force=True)
            last_eval = evaluate_at(cfg.steps)
        except (Interrupted, StepAbandoned) as stop:  # StepAbandoned: in the last evaluation
            step = stop.step if isinstance(stop, Interrupted) else cfg.steps
            if main:
                save_peft_adapter(model, adapter_dir, base_model_name_or_path=cfg.model.name)
                print(
                    f"saved checkpoint {step} in {ckpt.directory} and its adapter in "
                    f"{adapter_dir}; continue with --resume",
                    flush=True,
                )
            log.close()
            raise SystemExit(128 + stop.signum) from None  # 130 for SIGINT, 143 for SIGTERM
        except NonFiniteUpdates as diverged:
            diverged.checkpoint = ckpt.latest_step
            log.close()
            raise
        except RolloutsDown as down:
            if main:
                save_peft_adapter(model, adapter_dir, base_model_name_or_path=cfg.model.name)
            log.close()
            saved = (
                f"the checkpoint of step {down.step} is in {ckpt.directory}"
                if down.step in ckpt.steps
                else f"no step was trained (checkpoints: {ckpt.directory})"
            )
            raise RolloutsDown(
                f"{down}; {saved}, the adapter in {adapter_dir}; continue with --resume",
                down.step,
            ) from down
        if main:
            save_peft_adapter(model, adapter_dir, base_model_name_or_path=cfg.model.name)
            if cfg.log.export_merged:
                merged = os.path.join(cfg.out, "merged")
                save_pretrained(merge_lora(nnx.clone(model)), merged)
                tokenizer.save_pretrained(merged)
        log.close()
    summary = {
        "step": cfg.steps,
        **last_eval,
        **{k: v for k, v in metrics.items() if k.startswith("train/")},
        "adapter": adapter_dir,
        "sampler": engine,
        "seed": cfg.seed,
        "environment": run_environment(),
    }
    barrier("end of run")  # every process's checkpoint is written before any exits
    if not main:
        return summary
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: summary[k] for k in summary if k.startswith("eval/pass@")}))
    print(results_line(cfg.out), flush=True)
    return summary


def results_line(out: str) -> str:
    """Where a finished run's results are."""
    return (
        f"results in {out}: summary.json, metrics.jsonl, the plots, transcripts/, the adapter "
        f"in {os.path.join(out, 'adapter')} (experiments/evaluate.py --adapter scores it)"
    )


def finished_summary(cfg: Config) -> dict | None:
    """The summary of the run in cfg.out when it has trained its cfg.steps steps (a resume of
    it has nothing to do), else None."""
    path = os.path.join(cfg.out, "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if summary.get("step", 0) >= cfg.steps else None


PROBLEM_HASHES = "problem_files.json"
"""The sha256 of each local problems file of a run (beside its config.json): a resume on files
whose contents changed under the same path would train on other problems than it saved its
place in."""


def _problem_hashes(cfg: Config) -> dict[str, str]:
    import hashlib

    hashes = {}
    for key, path in (("problems", cfg.env.problems), ("eval_problems", cfg.env.eval_problems)):
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                hashes[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return hashes


def check_same_problems(cfg: Config) -> None:
    """A resume refuses problems files whose contents changed since record_problems (a
    ValueError)."""
    path = os.path.join(cfg.out, PROBLEM_HASHES)
    if not (cfg.resume and os.path.exists(path)):
        return
    with open(path) as f:
        saved = json.load(f)
    hashes = _problem_hashes(cfg)
    changed = [key for key in hashes if key in saved and saved[key] != hashes[key]]
    if changed:
        names = ", ".join(f"--env.{k.replace('_', '-')} {getattr(cfg.env, k)}" for k in changed)
        raise ValueError(
            f"--resume: {names} changed since the run started (its problem order and place "
            "refer to the old contents): restore the file, or start a new run"
        )


def record_problems(cfg: Config) -> None:
    """OUT/PROBLEM_HASHES for a new run (a resume keeps the first one)."""
    path = os.path.join(cfg.out, PROBLEM_HASHES)
    if not (cfg.resume and os.path.exists(path)):
        with open(path, "w") as f:
            json.dump(_problem_hashes(cfg), f, indent=2)


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
