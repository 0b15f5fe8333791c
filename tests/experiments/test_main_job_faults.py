"""The main job's faults, each through the real script in a subprocess: non-finite updates stop
the run without saving them, SIGTERM and SIGINT to the process group save a checkpoint that
resumes, a full disk is one line and resumes, and a finished run resumes to nothing while a
changed problems file is refused.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from script_runs import ROOT, read_jsonl, run_script, tiny_run_args


def _train_records(out) -> list[dict]:
    with open(f"{out}/metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "train/reward" in r]


def test_main_job_stops_on_non_finite_updates_without_saving_them(
    tiny_model_dir, problem_files, tmp_path, monkeypatch, capsys
):
    """After a good first step every update has a NaN learning rate (in-process, past the
    config's check: a diverged run's updates are as NaN): those updates are skipped, and the
    second in a row stops the run in one line (exit 3) with the checkpoints of the finite
    states only."""
    import copy

    import aime_grpo
    import numpy as np

    import toolgrpo.agents.training.loop as loop_module

    real, calls = loop_module.grpo_step, []

    def poisoned(state, batch, cfg, place=None):
        calls.append(1)
        if len(calls) > 1:
            cfg = copy.copy(cfg)
            object.__setattr__(cfg, "learning_rate", float("nan"))
        return real(state, batch, cfg, place=place)

    monkeypatch.setattr(loop_module, "grpo_step", poisoned)
    out = tmp_path / "run"
    args = tiny_run_args(tiny_model_dir, *problem_files, str(out))
    with pytest.raises(SystemExit) as stopped:
        aime_grpo.main([*args, "--steps", "5", "--grpo.max-skipped-updates", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 3, err
    assert err[-1].startswith("error: the updates of steps 2-3 had a non-finite loss"), err
    assert "Traceback" not in "\n".join(err)
    assert [r["train/skipped_updates"] for r in _train_records(out)] == [0, 1, 1]
    # checkpoint 2 holds step 1's state (its update was skipped); nothing of step 3 is saved
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"]
    assert not (out / "adapter").exists()
    from safetensors.numpy import load_file

    one = load_file(f"{out}/checkpoint_adapters/1/adapter_model.safetensors")
    two = load_file(f"{out}/checkpoint_adapters/2/adapter_model.safetensors")
    assert all(np.isfinite(one[k]).all() and (one[k] == two[k]).all() for k in one)


def _signal_during_save(proc, out, signum) -> None:
    """Once the process group's first signal is sent, the next two go while a checkpoint is
    being written when this sees its temporary directory (else soon after): what `uv run`'s
    forwarding and an impatient scheduler give."""

    os.killpg(proc.pid, signum)  # the group of the test's own process (start_new_session)
    deadline = time.monotonic() + 60  # a hang guard: the save takes about a second here
    while time.monotonic() < deadline and proc.poll() is None:
        if any("orbax-checkpoint-tmp" in n for n in os.listdir(out / "checkpoints")):
            break
        time.sleep(0.005)
    for _ in range(2):
        if proc.poll() is None:
            os.killpg(proc.pid, signum)


@pytest.mark.parametrize("signame,code", [("SIGTERM", 143), ("SIGINT", 130)])
@pytest.mark.slow
def test_main_job_stop_signals_to_the_process_group_save_and_resume(
    tiny_model_dir, problem_files, tmp_path, signame, code
):
    """`uv run` without a terminal, its process group signalled (SLURM's and `kill -PGID`'s
    way; uv forwards each signal again): the step in flight is finished or its wait cut short,
    a complete checkpoint and adapter/ are written, the exit code is 128 + the signal, stderr
    has no traceback, and --resume continues from that checkpoint."""
    import shutil
    import time

    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    out = tmp_path / "run"
    args = tiny_run_args(tiny_model_dir, *problem_files, str(out))
    args[args.index("--log.checkpoint-every") + 1] = "50"
    proc = subprocess.Popen(
        [uv, "run", "python", "experiments/aime_grpo.py", *args, "--steps", "100"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,  # its own process group, which alone the test signals
    )
    try:
        deadline = time.monotonic() + 300  # a hang guard: the first step takes ~20 s here
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and '"train/reward"' in metrics.read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        _signal_during_save(proc, out, getattr(signal, signame))
        stdout, stderr = proc.communicate(timeout=300)  # a hang guard
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    saved = sorted(os.listdir(out / "checkpoints"))
    assert len(saved) == 1 and saved[0].isdigit(), saved  # complete: no temporary directory
    step = int(saved[0])
    assert f"saved checkpoint {step} in" in stdout
    assert os.listdir(out / "checkpoint_adapters") == [saved[0]]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert [r["step"] for r in _train_records(out)][-1] == step
    resumed = run_script("aime_grpo.py", *args, "--resume", "--steps", str(step + 1), timeout=600)
    assert f"resumed from step {step}" in resumed
    assert [r["step"] for r in _train_records(out)] == list(range(1, step + 2))


FULL_DISK = """
set -u
mount -t tmpfs -o size=4m tmpfs "$MNT" || exit 77
free=$(df -k --output=avail "$MNT" | tail -1)
head -c $(( (free - 64) * 1024 )) /dev/zero > "$MNT/filler"   # 64 KiB left: less than a checkpoint
"$PY" experiments/aime_grpo.py "$@" > "$LOGS/full.out" 2> "$LOGS/full.err"
echo $? > "$LOGS/full.rc"
ls "$MNT/run/checkpoints" > "$LOGS/full.ls"
rm "$MNT/filler"                                              # space freed
"$PY" experiments/aime_grpo.py "$@" --resume > "$LOGS/resumed.out" 2> "$LOGS/resumed.err"
echo $? > "$LOGS/resumed.rc"
ls "$MNT/run/checkpoints" > "$LOGS/resumed.ls"
"""


@pytest.mark.slow
def test_main_job_on_a_full_disk_says_so_in_one_line_and_resumes(
    tiny_model_dir, problem_files, tmp_path
):
    """--out on a real full disk: a tmpfs of the test's own, mounted in a private mount
    namespace (unshare -m: root only, else skipped) over a directory of tmp_path. The first
    checkpoint does not fit: one line with what to do, exit 4, its temporary directory
    removed; once space is freed, --resume runs to the end."""
    import shutil

    mnt, logs = tmp_path / "mnt", tmp_path / "logs"
    mnt.mkdir()
    logs.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"],
        check=False,
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here (root only): {probe.stderr.strip()}")
    args = tiny_run_args(tiny_model_dir, *problem_files, str(mnt / "run"))
    done = subprocess.run(
        ["unshare", "-m", "bash", "-c", FULL_DISK, "full-disk", *args, "--steps", "2"],
        env={**os.environ, "MNT": str(mnt), "LOGS": str(logs), "PY": sys.executable},
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard: two tiny runs take about a minute
    )
    assert done.returncode == 0, done.stderr[-2000:]
    read = lambda name: (logs / name).read_text()
    lines = read("full.err").splitlines()
    err = [line for line in lines if line.strip() and not line.startswith("GRPO")]  # not tqdm's
    assert read("full.rc").strip() == "4", read("full.err")[-3000:]
    assert len(err) == 1 and "Traceback" not in read("full.err"), err
    assert err[0].startswith("error: no space left on the disk of") and "--resume" in err[0]
    assert read("full.ls").split() == []  # no checkpoint, and no temporary directory left
    assert read("resumed.rc").strip() == "0", read("resumed.err")[-3000:]
    assert read("resumed.ls").split() == ["1", "2"]


@pytest.mark.slow
def test_a_finished_run_resumes_to_nothing_and_a_changed_problems_file_is_refused(
    tiny_model_dir, problem_files, tmp_path
):
    train = tmp_path / "train.jsonl"
    shutil.copy(problem_files[0], train)
    out = str(tmp_path / "run")
    args = [*tiny_run_args(tiny_model_dir, str(train), problem_files[1], out), "--steps", "1"]
    first = run_script("aime_grpo.py", *args, timeout=600)
    assert f"results in {out}: summary.json" in first
    records = read_jsonl(f"{out}/metrics.jsonl")
    again = run_script("aime_grpo.py", *args, "--resume", timeout=600)
    assert "has trained its 1 steps; nothing to do" in again and "rollouts:" not in again
    assert read_jsonl(f"{out}/metrics.jsonl") == records  # no second final evaluation
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[::-1]) + "\n")  # the same problems, in another order
    changed = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "aime_grpo.py"), *args, "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    message = f"--resume: --env.problems {train} changed since the run started"
    assert changed.returncode == 2 and message in changed.stderr, changed.stderr[-2000:]
