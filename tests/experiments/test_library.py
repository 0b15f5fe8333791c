"""`train` as a library call from another program: it raises typed exceptions (never exits),
and reports through logging (never prints), on the tiny local model and problems."""

import dataclasses
import logging
import os
import signal

import pytest

from toolgrpo.agents.rollout import RolloutConfig
from toolgrpo.agents.training import (
    Config,
    ConfigError,
    EnvConfig,
    EvalConfig,
    InputError,
    Interrupted,
    LogConfig,
    ModelConfig,
    SamplerConfig,
    TrainingError,
    train,
)
from toolgrpo.learners.train import GRPOConfig


def tiny_config(model: str, train_file: str, test_file: str, out: str, **changes) -> Config:
    """A two-problem-a-step run of the tiny model: what a notebook would write."""
    cfg = Config(
        out=out,
        steps=2,
        problems_per_step=2,
        max_staleness=0,
        model=ModelConfig(name=model, lora_rank=4),
        env=EnvConfig(problems=train_file, eval_problems=test_file),
        sampler=SamplerConfig(engine="jax"),
        rollout=RolloutConfig(group_size=2, max_turn_tokens=12, max_total_tokens=512),
        grpo=GRPOConfig(micro_batch_size=2),
        eval=EvalConfig(every=0, samples=2, limit=2),
        log=LogConfig(wandb=False, checkpoint_every=1),
    )
    return dataclasses.replace(cfg, **changes)


def test_bad_input_raises_an_input_error_and_writes_nothing(
    tiny_model_dir, problem_files, tmp_path
):
    out = tmp_path / "run"
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(InputError, match="no-such-model") as refused:
        train(tiny_config(missing, *problem_files, str(out)))
    assert refused.value.exit_code == 2 and isinstance(refused.value, ValueError)
    assert not out.exists()  # checked before anything is written


def test_a_directory_of_something_else_is_refused_with_a_config_error(
    tiny_model_dir, problem_files, tmp_path
):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ConfigError, match="holds no run of this project"):
        train(tiny_config(tiny_model_dir, *problem_files, str(out), overwrite=True))
    assert os.listdir(out) == ["holiday.jpg"]


def test_a_stop_signal_raises_interrupted_after_a_checkpoint_and_the_caller_goes_on(
    tiny_model_dir, problem_files, tmp_path, monkeypatch, caplog, capsys
):
    """SIGINT (to this process, as Ctrl-C would send it) during step 1's update: the update is
    finished, its checkpoint and the adapter are saved, and `train` raises Interrupted; the
    reports go to the library's loggers, nothing to stdout."""
    from toolgrpo.agents.training import loop as loop_module

    real = loop_module.grpo_step

    def update_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # recorded by train's StopSignals, not raised
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "grpo_step", update_then_signal)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    with (
        caplog.at_level(logging.INFO, logger="toolgrpo.agents"),
        pytest.raises(Interrupted) as stop,
    ):
        train(tiny_config(tiny_model_dir, *problem_files, str(out)))
    assert isinstance(stop.value, TrainingError)
    assert stop.value.step == 1 and stop.value.exit_code == 130
    assert "continue with --resume" in str(stop.value)
    assert (out / "checkpoints").is_dir() and (out / "adapter" / "adapter_config.json").exists()
    assert (out / "checkpoint_adapters" / "1" / "adapter_config.json").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the caller's Ctrl-C is its own again
    assert any("rollouts: in-process JAX sampler" in r.getMessage() for r in caplog.records)
    assert "rollouts:" not in capsys.readouterr().out
