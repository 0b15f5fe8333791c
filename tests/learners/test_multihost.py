"""The learner across two processes of this machine (jax.distributed on 127.0.0.1, CPU
collectives over gloo, two fake devices in each): the mesh spans both processes' four devices;
the same GRPO steps give the same gradient norms and parameters as one process on one device,
within what float32 reordering allows, starting from a checkpoint of step 1 that one process
wrote (the main job's two-process resume is tests/experiments/test_main_job_multihost.py).

The tolerances are those of tests/learners/test_sharding.py, for the same reason: sharding
reorders float32 sums, so a gradient differs by about sqrt(n) * 6e-8 of its scale (GRAD_RTOL
1e-5 is ~100x that; a device's share missing from a reduction is off by tens of percent), and
Adam turns a gradient error delta into a parameter error of about lr * delta / sqrt(v_hat) a
step, never more than about 2 lr a step (where the gradient is about zero and a rounding error
decides the update's sign).
"""

import socket
import subprocess
import sys

import numpy as np
import pytest
from tiny import TESTS_DIR, subprocess_env

WORKER = f"{TESTS_DIR}/learners/multihost_worker.py"
GRAD_RTOL, LR, STEPS = 1e-5, 1e-2, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(directory, steps, out, processes: int) -> list[str]:
    """The worker in `processes` processes (1: no jax.distributed, one device); their stdout."""
    if processes == 1:
        cmds = [[sys.executable, WORKER, str(directory), str(steps), str(out)]]
        env = subprocess_env(JAX_PLATFORMS="cpu")
    else:
        address = f"127.0.0.1:{free_port()}"
        cmds = [
            [
                sys.executable,
                WORKER,
                str(directory),
                str(steps),
                str(out),
                address,
                str(processes),
                str(rank),
            ]
            for rank in range(processes)
        ]
        env = subprocess_env(
            JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"
        )
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for c in cmds
    ]
    outputs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        outputs.append(stdout)
    return outputs


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_from_a_one_process_checkpoint(tmp_path):
    """The two processes start from the single process's checkpoint of step 1 (each reads its
    shards of arrays written whole) and write their own of steps 2 and 3."""
    run_processes(tmp_path / "one", STEPS, tmp_path / "one.npz", processes=1)
    import shutil

    (tmp_path / "two").mkdir()
    shutil.copytree(tmp_path / "one" / "1", tmp_path / "two" / "1")
    again = run_processes(tmp_path / "two", STEPS, tmp_path / "two.npz", processes=2)
    assert all("RESUMED 1" in out for out in again)  # each process restored step 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.isdigit()) == [
        "1",
        "2",
        "3",
    ]  # the two processes wrote steps 2 and 3
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert (int(one["devices"]), int(two["devices"])) == (1, 4)
    assert int(two["spanned"]) == 4  # a LoRA matrix lives on the devices of both processes
    # the steps before the checkpoint (carried in it) and the one after it
    assert one["history"].shape == two["history"].shape == (STEPS, 2)
    norms1, norms2 = one["history"][:, 1], two["history"][:, 1]
    assert (norms1 > 0).all()
    np.testing.assert_allclose(norms2, norms1, rtol=GRAD_RTOL)
    np.testing.assert_allclose(
        two["history"][:, 0], one["history"][:, 0], rtol=0, atol=GRAD_RTOL * norms1.max()
    )
    # the largest gradient element is at most the gradient's norm: delta bounds its error
    delta = GRAD_RTOL * norms1.max()
    lora = sorted(k for k in one.files if k.startswith("lora_"))
    assert lora and lora == sorted(k for k in two.files if k.startswith("lora_"))
    for key in lora:
        a, b = one[key], two[key]
        v_hat = one[key.replace("lora_", "nu_")] / (1 - 0.999**STEPS)
        tol = np.minimum(4 * STEPS * LR * delta / np.sqrt(v_hat + 1e-30), 2 * STEPS * LR) + 1e-6
        err = np.abs(a - b)
        assert (err <= tol).all(), (key, err.max(), tol[err.argmax()])
