"""The run log: W&B runs continue across --resume (offline mode: no account, no network)."""

import os

import pytest
from grpo_loop import RunLog


@pytest.mark.slow
def test_a_resumed_run_logs_to_the_same_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = str(tmp_path / "run")

    def run_id(resume: bool) -> str:
        log = RunLog(run_dir, {"steps": 3}, wandb_mode="offline", resume=resume)
        log.log(1, {"train/reward": 0.5})
        identity = log.wandb.id
        log.close()
        return identity

    first = run_id(resume=False)
    assert open(os.path.join(run_dir, "wandb_run_id")).read().strip() == first
    assert run_id(resume=True) == first
    assert run_id(resume=False) != first  # a new run (after --overwrite) is a new W&B run
