"""The GRPO loop as a library: collect, dynamic sampling, update, adapter sync, evaluation,
logging, checkpoints, resume.

    from agents.training import Config, train
    train(Config(steps=50, out="runs/x"))                      # the main job, programmatically

    from agents.training import GRPOLoop, ProblemOrder, RunLog, fit, evaluate
    loop = GRPOLoop(model=model, state=state, cfg=grpo_cfg, rollouts=rollouts, problems_per_step=8)
    fit(loop, ProblemOrder(n), RunLog("runs/y", cfg), start=0, steps=20, seed=0)

Modules: config (the settings tree), loop (one step), pipeline (rollouts ahead of the learner,
within max_staleness), distributed (jax.distributed and the mesh of a multi-process learner),
evaluation (pass@k), runlog (the run's record), run (a whole run: directory, checkpoints, Ctrl-C,
resume), cli (flags and YAML, one-line errors).
"""

from agents.training.config import (
    Config,
    EnvConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    SamplerConfig,
    config_from_dict,
)
from agents.training.evaluation import evaluate, pass_at_k
from agents.training.loop import GRPOLoop, ProblemOrder, RolloutsDown
from agents.training.run import Interrupted, build_learner, fit, train
from agents.training.runlog import RunLog, run_environment

__all__ = [
    "Config",
    "EnvConfig",
    "EvalConfig",
    "GRPOLoop",
    "Interrupted",
    "LogConfig",
    "ModelConfig",
    "ProblemOrder",
    "RolloutsDown",
    "RunLog",
    "SamplerConfig",
    "build_learner",
    "config_from_dict",
    "evaluate",
    "fit",
    "pass_at_k",
    "run_environment",
    "train",
]
