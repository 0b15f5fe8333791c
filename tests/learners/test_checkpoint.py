import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from tiny import subprocess_env, tiny_model

from toolgrpo.learners.checkpoint import Checkpointer, CheckpointError
from toolgrpo.learners.train import GRPOConfig, init_state

WORKER = pathlib.Path(__file__).with_name("resume_worker.py")


def worker(directory, total, kill_after, out):
    return subprocess.run(
        [sys.executable, str(WORKER), str(directory), str(total), str(kill_after), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=subprocess_env(JAX_PLATFORMS="cpu"),
        check=False,
    )


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    straight = worker(tmp_path / "a", 6, -1, tmp_path / "a.npz")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = worker(tmp_path / "b", 6, 3, tmp_path / "unused.npz")
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "unused.npz").exists()
    resumed = worker(tmp_path / "b", 6, -1, tmp_path / "b.npz")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a.files == b.files and int(a["updates"]) == 6  # 6 batches (of 2 PPO epochs each)
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert sorted(os.listdir(tmp_path / "b")) == ["5", "6"]  # keep=2, named by the loop's step


def test_incompatible_or_missing_checkpoints_are_clear_errors(tmp_path):
    cfg = GRPOConfig()
    ckpt = Checkpointer(str(tmp_path / "c"), keep=1)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.restore(init_state(tiny_model(), cfg))
    ckpt.save(0, init_state(tiny_model(), cfg), {"data_position": 0})
    other = tiny_model(lora_rank=8, lora_alpha=8)  # the same model with a larger adapter
    with pytest.raises(CheckpointError, match="does not fit"):
        ckpt.restore(init_state(other, cfg))
    # corrupt the stored arrays: a clear error, never a silent fresh start
    for path in (tmp_path / "c").rglob("*"):
        if path.is_file() and path.stat().st_size > 100 and "record" not in str(path):
            path.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="unreadable"):
        ckpt.restore(init_state(tiny_model(), cfg))


def test_save_every_n_steps(tmp_path):
    state = init_state(tiny_model(), GRPOConfig())
    ckpt = Checkpointer(str(tmp_path), keep=5, every=3)
    saved = [ckpt.maybe_save(s, state, {"p": s}) for s in range(1, 8)]
    assert saved == [False, False, True, False, False, True, False]
    assert ckpt.maybe_save(7, state, force=True)
    assert sorted(int(d) for d in os.listdir(tmp_path)) == [3, 6, 7]
