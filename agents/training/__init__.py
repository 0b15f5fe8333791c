"""The GRPO loop as a library: collect, dynamic sampling, update, adapter sync, evaluation,
logging, checkpoints, resume.

    from toolgrpo.agents.training import Config, train
    train(Config(steps=50, out="runs/x"))                      # the main job, programmatically

    from toolgrpo.agents.training import Evaluation, GRPOLoop, ProblemOrder, RunLog, fit
    loop = GRPOLoop(model=model, state=state, cfg=grpo_cfg, rollouts=rollouts, problems_per_step=8)
    log = RunLog("runs/y", cfg)
    fit(loop, ProblemOrder(n), log, start=0, steps=20, seed=0,
        hooks=[Evaluation(evaluator, range(30), log).hook(every=5)])

`train` and everything under it raise (errors: TrainingError and its kinds) and log (module
loggers); only the entry points print and exit (cli).

Modules: config (the settings tree), errors (what a run raises), loop (one step), pipeline
(rollouts ahead of the learner, within max_staleness), fit (the steps), hooks (what runs between
steps: checkpoints, evaluations, transcripts, your own), health (the training-health monitor's
warnings), signals (SIGINT/SIGTERM as a stop after
a checkpoint), distributed (jax.distributed and the mesh of a multi-process learner), evaluation
(pass@k), runlog (the run's record), rundir (the run directory), checks (a run's inputs, checked
before it loads), build (the learner and the rollout engine from a config), run (a whole run:
checkpoints, Ctrl-C, resume), cli (flags and YAML, logging, one-line errors and exit codes).
"""

from toolgrpo.agents.training.build import build_learner
from toolgrpo.agents.training.config import (
    Config,
    EnvConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    SamplerConfig,
    config_from_dict,
)
from toolgrpo.agents.training.errors import (
    ConfigError,
    DiskFull,
    HubUnreachable,
    InputError,
    Interrupted,
    TrainingError,
)
from toolgrpo.agents.training.evaluation import evaluate, pass_at_k
from toolgrpo.agents.training.fit import fit
from toolgrpo.agents.training.health import HealthConfig, HealthMonitor, HealthWarning
from toolgrpo.agents.training.hooks import Evaluation, Hook, StepDone, transcripts
from toolgrpo.agents.training.loop import GRPOLoop, NonFiniteUpdates, ProblemOrder, RolloutsDown
from toolgrpo.agents.training.run import train
from toolgrpo.agents.training.runlog import RunLog, run_environment

__all__ = [
    "Config",
    "ConfigError",
    "DiskFull",
    "EnvConfig",
    "EvalConfig",
    "Evaluation",
    "GRPOLoop",
    "HealthConfig",
    "HealthMonitor",
    "HealthWarning",
    "Hook",
    "HubUnreachable",
    "InputError",
    "Interrupted",
    "LogConfig",
    "ModelConfig",
    "NonFiniteUpdates",
    "ProblemOrder",
    "RolloutsDown",
    "RunLog",
    "SamplerConfig",
    "StepDone",
    "TrainingError",
    "build_learner",
    "config_from_dict",
    "evaluate",
    "fit",
    "pass_at_k",
    "run_environment",
    "train",
    "transcripts",
]
