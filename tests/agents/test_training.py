"""The loop as a library: the config tree, resume rules, pass@k, the run log, and the installed
package running the loop from another program."""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from toolgrpo.agents.training import (
    Config,
    EvalConfig,
    LogConfig,
    ModelConfig,
    RunLog,
    config_from_dict,
    pass_at_k,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_resumed_run_logs_to_the_same_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = str(tmp_path / "run")

    def run_id(resume: bool) -> str:
        log = RunLog(run_dir, {"steps": 3}, wandb_mode="offline", resume=resume)
        log.log(1, {"train/reward": 0.5})
        assert log.wandb is not None  # offline, not off
        identity = log.wandb.id
        log.close()
        return identity

    first = run_id(resume=False)
    assert pathlib.Path(run_dir, "wandb_run_id").read_text().strip() == first
    assert run_id(resume=True) == first
    assert run_id(resume=False) != first  # a new run (after --overwrite) is a new W&B run


def test_every_setting_of_every_part_is_a_flag_and_a_yaml_key(tmp_path):
    """The tree is the library's own configs: a flag or a file key reaches RolloutConfig and
    GRPOConfig fields the main job never named, and defaults live in one place."""
    from toolgrpo.agents.rollout import RolloutConfig
    from toolgrpo.agents.training.cli import load_config
    from toolgrpo.learners.train import GRPOConfig

    assert Config().rollout == RolloutConfig() and Config().grpo == GRPOConfig()
    cfg = load_config(
        [
            "--grpo.eps-high",
            "0.31",
            "--grpo.aggregation",
            "token-mean",
            "--grpo.no-scale-by-std",
            "--rollout.top-k",
            "5",
            "--steps",
            "7",
        ],
        Config,
    )
    assert (cfg.grpo.eps_high, cfg.grpo.aggregation, cfg.grpo.scale_by_std) == (
        0.31,
        "token-mean",
        False,
    )
    assert cfg.rollout.top_k == 5 and cfg.steps == 7 and cfg.grpo.eps_low == GRPOConfig().eps_low
    cfg = load_config(
        [
            "--env.rewards.tool-use",
            "0.2",
            "--env.tool-timeout-s",
            "3",
            "--env.eval-problems",
            "a.jsonl",
        ],
        Config,
    )
    kwargs = cfg.env.env_kwargs("test")  # what gym.make gets for the evaluation split
    assert kwargs["reward_weights"].tool_use == 0.2 and kwargs["tool_timeout_s"] == 3.0
    assert (kwargs["split"], kwargs["problems"]) == ("test", "a.jsonl")
    assert "problems" not in cfg.env.env_kwargs("train")  # the env's own training set
    (tmp_path / "c.yaml").write_text("steps: 9\ngrpo:\n  tis_cap: 2.0\n  ppo_epochs: 2\n")
    cfg = load_config(["--config", str(tmp_path / "c.yaml"), "--grpo.ppo-epochs", "3"], Config)
    assert (cfg.steps, cfg.grpo.tis_cap, cfg.grpo.ppo_epochs) == (9, 2.0, 3)  # flags win
    assert cfg.grpo_for_run().total_steps == 27  # the schedule spans steps x ppo_epochs


def test_the_model_computes_in_bf16_on_accelerators_and_fp32_on_the_cpu():
    from toolgrpo.agents.training.cli import load_config

    auto = ModelConfig()
    assert [auto.compute_dtype(b) for b in ("cpu", "gpu", "tpu")] == [
        "float32",
        "bfloat16",
        "bfloat16",
    ]
    assert ModelConfig(dtype="float32").compute_dtype("gpu") == "float32"
    cfg = load_config(
        [
            "--model.attention",
            "blockwise",
            "--model.attention-block",
            "256",
            "--grpo.micro-batch-tokens",
            "32768",
        ],
        Config,
    )
    assert (cfg.model.attention, cfg.model.attention_block) == ("blockwise", 256)
    assert cfg.grpo.micro_batch_tokens == 32768
    with pytest.raises(ValueError, match="attention_block"):
        ModelConfig(attention_block=0)


def test_config_from_dict_checks_every_value_and_names_its_path():
    cfg = config_from_dict({"steps": 3, "model": {"lora_rank": 4}, "eval": {"every": 0}})
    assert (cfg.steps, cfg.model.lora_rank, cfg.eval.every) == (3, 4, 0)
    assert config_from_dict(dataclasses.asdict(cfg)) == cfg  # what config.json holds, read back
    for values, message in [
        ({"grpo": {"eps_high": "high"}}, "grpo.eps_high is 'high', expected float"),
        ({"rollout": {"group_sise": 4}}, "unknown settings ['rollout.group_sise']"),
        ({"log": {"checkpoint_every": 0}}, "log: checkpoint_every and keep_checkpoints"),
        ({"sampler": {"engine": "tpu"}}, "sampler.engine is 'tpu'"),
        ({"steps": True}, "steps is True, expected int"),
        ({"model": 3}, "model. must map setting names"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            config_from_dict(values)


def test_a_resume_may_change_only_the_resumable_settings():
    from toolgrpo.agents.training.rundir import config_changes

    saved = json.loads(json.dumps(dataclasses.asdict(Config()), default=str))
    allowed = dataclasses.replace(
        Config(), steps=500, eval=EvalConfig(every=5), log=LogConfig(wandb=False)
    )
    assert config_changes(saved, dataclasses.asdict(allowed)) == []
    changed = dataclasses.replace(Config(), model=ModelConfig(lora_rank=8), seed=3)
    assert config_changes(saved, dataclasses.asdict(changed)) == [
        "seed: 0 -> 3",
        "model.lora_rank: 128 -> 8",
    ]


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - (3 * 2) / (4 * 3))  # 1 - C(3,2)/C(4,2)
    with pytest.raises(ValueError, match="needs at least 8 samples"):
        pass_at_k(4, 1, 8)


@pytest.mark.slow
def test_the_installed_package_runs_the_loop_from_another_program(installed_python, tmp_path):
    """`pip install .` in a fresh venv, then a script outside the repo imports the loop and
    trains a tiny local model for two steps (in-process JAX sampler)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from make_tiny import make_model, make_problems

    model = make_model(str(tmp_path / "model"))
    train, test = make_problems(str(tmp_path / "problems"))
    script = f"""
import sys
from toolgrpo.agents.rollout import RolloutConfig
from toolgrpo.agents.training import Config, EnvConfig, EvalConfig, LogConfig, ModelConfig, SamplerConfig, train
from toolgrpo.learners.train import GRPOConfig
cfg = Config(out={str(tmp_path / "run")!r}, steps=2, problems_per_step=2,
             model=ModelConfig(name={model!r}, lora_rank=4),
             env=EnvConfig(problems={train!r}, eval_problems={test!r}),
             sampler=SamplerConfig(engine="jax"),
             rollout=RolloutConfig(group_size=2, max_turn_tokens=8, max_total_tokens=512),
             grpo=GRPOConfig(micro_batch_size=2), eval=EvalConfig(samples=2, limit=1),
             log=LogConfig(wandb=False))
summary = train(cfg)
import toolgrpo.agents.training
print("LOOP", toolgrpo.agents.training.__file__, summary["step"], summary["eval/pass@1"])
"""
    outside = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [installed_python, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=outside,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("LOOP"))
    _, origin, step, pass1 = line.split()
    assert origin.startswith(os.path.dirname(os.path.dirname(installed_python))), origin
    assert step == "2" and 0.0 <= float(pass1) <= 1.0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/reward" in r] == [1, 2]


@pytest.mark.parametrize(
    "fault,code,words",
    [
        ("diverged", 3, "non-finite"),
        ("disk", 4, "no space left on the disk"),
        ("rollouts", 5, "the rollout server is down"),
    ],
)
def test_a_fault_ends_the_main_job_in_one_line_with_its_own_exit_code(fault, code, words, capsys):
    """What a scheduler reads: 3 for a run that diverged (rerunning does not help), 4 and 5 for
    a full disk and rollout servers that stay down (resume once they are mended)."""
    import errno

    from toolgrpo.agents.training import RolloutsDown
    from toolgrpo.agents.training.cli import exit_codes
    from toolgrpo.agents.training.loop import NonFiniteUpdates

    raised = {
        "diverged": NonFiniteUpdates(step=5, count=3, checkpoint=2),
        "disk": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/metrics.jsonl"),
        "rollouts": RolloutsDown("the rollout server is down: refused", step=4),
    }[fault]
    with pytest.raises(SystemExit) as stopped, exit_codes():
        raise raised
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == code and len(err) == 1 and words in err[0], err
    with pytest.raises(type(raised)), exit_codes(debug=True):  # --debug: the traceback
        raise raised
