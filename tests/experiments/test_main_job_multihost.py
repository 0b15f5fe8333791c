"""The main job on two processes of this machine (--dist.*: jax.distributed on 127.0.0.1, gloo
CPU collectives, two fake devices each, the state sharded over all four): process 0 plays the
rollouts and sends each batch to process 1, both update, process 0 alone writes the logs and
adapters; both write the checkpoint, and two new processes resume from it. (That the updates
across processes are those of one process is tests/learners/test_multihost.py's check, on
batches whose rewards differ, which the tiny random model's rarely do.)
"""

import json
import socket
import subprocess
import sys

import pytest
from script_runs import ROOT, tiny_run_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_job(args, processes: int, timeout: int = 600) -> list[str]:
    """aime_grpo.py with `args` in `processes` processes; their stdout (process 0's first)."""
    import os

    script = [sys.executable, str(ROOT / "experiments" / "aime_grpo.py"), *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if processes == 1:
        cmds = [script]
    else:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        address = f"127.0.0.1:{free_port()}"
        cmds = [
            [
                *script,
                "--dist.coordinator",
                address,
                "--dist.num-processes",
                str(processes),
                "--dist.process-id",
                str(rank),
                "--dist.data",
                "2",
            ]
            for rank in range(processes)
        ]
    procs = [
        subprocess.Popen(
            c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )
        for c in cmds
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(stdout)
    return outs


def train_records(out) -> list[dict]:
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if "train/reward" in r]


@pytest.mark.slow
def test_main_job_on_two_processes_trains_and_resumes(tiny_model_dir, problem_files, tmp_path):
    out = tmp_path / "run"
    args = tiny_run_args(tiny_model_dir, *problem_files, str(out))
    args[args.index("--grpo.micro-batch-size") + 1] = "4"  # one micro-batch: a row a device
    first = main_job([*args, "--steps", "2"], processes=2)
    assert "rollouts:" in first[0] and "rollouts:" not in first[1]  # process 0 plays them
    records = train_records(out)
    assert [r["step"] for r in records] == [1, 2]  # logged once, by process 0
    assert [r["train/staleness"] for r in records] == [0, 1]  # pipelined across processes too
    for name in (
        "checkpoints/2",
        "checkpoint_adapters/2/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "summary.json",
        "config.json",
    ):
        assert (out / name).exists(), name
    again = main_job([*args, "--steps", "3", "--resume"], processes=2)
    assert all("resumed from step 2" in text for text in again)  # both restored their shards
    assert [r["step"] for r in train_records(out)] == [1, 2, 3]
    assert (out / "checkpoints" / "3").exists()
