"""PythonSandbox's limits on processes and memory: fork and thread floods stop at their caps,
daemons and the processes of a discarded cell are gone when the call returns, a cell that
kills its parent or its process group hurts nothing, crashes and exits are reported, a memory
bomb is reported and the next cell works. Each hostile snippet is bounded (test_sandbox.py's
docstring says how).
"""

from __future__ import annotations

import threading
import uuid

import pytest
from sandboxes import need, processes_with, still_serves, wait_until


# --- processes ---------------------------------------------------------------------------------------
def test_fork_flood_stops_at_the_process_cap(sandbox):
    need(sandbox, "process_cap")
    code = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(3000):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(3)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
        "print(n)"
    )
    with sandbox.session() as s:
        s.run("kept = True")
        r = s.run(code, timeout_s=20)
        assert r.status == "ok", r
        assert 0 < int(r.stdout) < sandbox.config.max_processes
        # the flood's killed children free their slots within milliseconds: the next call of
        # the same session (same uid, same process cap) must still run, with its state
        assert s.run("print(kept)").stdout == "True\n"
    still_serves(sandbox)


def test_thousand_threads_stop_at_the_cap(sandbox):
    need(sandbox, "process_cap")
    code = (
        "import threading, time\n"
        "started = 0\n"
        "try:\n"
        "    for _ in range(1000):\n"
        "        threading.Thread(target=time.sleep, args=(3,), daemon=True).start()\n"
        "        started += 1\n"
        "finally:\n"
        "    print(started)"
    )
    r = sandbox.run(code, timeout_s=20)
    assert r.status == "error" and "can't start new thread" in r.stderr, r
    assert int(r.stdout) < sandbox.config.max_processes
    still_serves(sandbox)


@pytest.mark.parametrize("stateful", [False, True])
def test_double_forked_setsid_daemon_is_gone_when_the_call_returns(sandbox, stateful):
    need(sandbox, "daemon_cleanup")
    marker = f"0.{uuid.uuid4().int % 10**12:012d}"  # `sleep 30 0.xxx` sleeps ~30 s, a unique argv
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '30', '{marker}'])\n"
        "    os._exit(0)\n"
        "time.sleep(1.5)\n"
        "print('parent done')"
    )
    seen = []
    watcher = threading.Thread(
        target=lambda: seen.append(wait_until(lambda: processes_with(marker), timeout_s=1.4))
    )
    watcher.start()
    if stateful:
        with sandbox.session() as s:
            r = s.run(code)
            assert r.stdout == "parent done\n"
            gone_while_session_open = wait_until(lambda: not processes_with(marker), 1.0)
    else:
        r = sandbox.run(code)
        gone_while_session_open = True
    watcher.join()
    assert seen == [True], "the daemon never appeared: the test itself is broken"
    assert r.status == "ok"
    assert gone_while_session_open and wait_until(lambda: not processes_with(marker), 1.0)


def unkilled(pids: list[int]) -> list[int]:
    """Those of `pids` that neither are exiting (PF_EXITING, or a zombie) nor have SIGKILL
    pending: what outlives a call that returned before its kill was sent."""
    found = []
    for pid in pids:
        try:  # pending first: a SIGKILL taken off it sets PF_EXITING before the flags are read
            with open(f"/proc/{pid}/status") as f:
                pending = [
                    int(line.split()[1], 16)
                    for line in f
                    if line.startswith(("SigPnd:", "ShdPnd:"))
                ]
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError, ValueError):
            continue
        exiting = fields[0] in ("Z", "X") or int(fields[6]) & 0x4  # PF_EXITING
        if not exiting and not any(mask & (1 << 8) for mask in pending):  # bit 8: SIGKILL
            found.append(pid)
    return found


SPAWN = {  # code leaving a `sleep 30 <marker>` behind, by three routes out of the cell's tree
    "child": "import os\nif os.fork() == 0:\n    os.execv('/bin/sleep', ['sleep', '30', M])\n",
    "orphan": (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        os.execv('/bin/sleep', ['sleep', '30', M])\n    os._exit(0)\n"
        "time.sleep(0.3)\n"
    ),
    "state_child": (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "pid = libc.syscall(56, 0x8000 | 17, 0, 0, 0, 0)  # clone(CLONE_PARENT)\n"
        "if pid == 0:\n    os.execv('/bin/sleep', ['sleep', '30', M])\n"
        "assert pid > 0, ctypes.get_errno()\n"
    ),
}


@pytest.mark.parametrize("route", sorted(SPAWN))
@pytest.mark.parametrize("stateful", [False, True])
def test_processes_of_a_discarded_cell_are_killed_before_the_call_returns(sandbox, route, stateful):
    """A discarded cell's rollback may wait until after the reply only when the kernel's lists of
    children show that nothing of the code is left; each route out of the cell's tree must defeat
    that shortcut."""
    need(sandbox, "daemon_cleanup")
    marker = f"0.{uuid.uuid4().int % 10**12:012d}"
    code = (
        f"M = {marker!r}\n"
        + SPAWN[route]
        + "import time\ntime.sleep(0.5)\n"
        + ("raise RuntimeError('discard this cell')\n" if stateful else "print('done')\n")
    )
    with sandbox.session() as s:
        s.run("kept = 1")
        pids: list[int] = []
        watch = threading.Thread(
            target=lambda: wait_until(lambda: pids.extend(processes_with(marker)) or pids, 0.45)
        )
        watch.start()
        r = s.run(code) if stateful else sandbox.run(code)
        left = unkilled(pids)  # at once: a kill sent after the reply would still be on its way
        watch.join()
        assert pids, "the test itself is broken: the process never appeared"
        if stateful:
            assert r.status == "error" and "discard this cell" in r.stderr, r
            assert s.run("print(kept)").stdout == "1\n"
        else:
            assert r.status == "ok" and r.stdout == "done\n", r
    assert left == [], f"{route}: still running when the call returned"
    assert wait_until(lambda: not processes_with(marker), 2.0)
    still_serves(sandbox)


def test_kill_of_parent_and_process_group_does_not_hurt_the_sandbox(sandbox):
    with sandbox.session() as s:
        s.run("x = 'kept'")
        r = s.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('still here')")
        assert r.status == "ok" and r.stdout == "still here\n"
        assert s.run("print(x)").stdout == "kept\n"
        r = s.run("import os, signal\nos.killpg(os.getpgrp(), signal.SIGKILL)")
        assert r.status == "crashed" and r.exit_code == -9
        assert s.run("print(x)").stdout == "kept\n"
        r = s.run(
            "import os, signal\ntry:\n    os.kill(1, signal.SIGKILL)\nexcept OSError as e:\n"
            "    print(type(e).__name__)\nprint('alive')"
        )
        assert "alive" in r.stdout
        assert s.run("print(x)").stdout == "kept\n"
    still_serves(sandbox)


def test_deep_recursion_segfault_is_a_crash(sandbox):
    # Python 3.11 calls between Python functions use no C stack; repr of a deep list does.
    code = (
        "import sys\nsys.setrecursionlimit(10**8)\nx = []\n"
        "for _ in range(10**6):\n    x = [x]\nrepr(x)"
    )
    r = sandbox.run(code, timeout_s=20)
    if "RecursionError" in r.stderr:  # newer Pythons guard the C stack themselves
        assert r.status == "error"
    else:
        assert r.status == "crashed" and r.exit_code == -11, r
    still_serves(sandbox)


def test_os_exit_is_a_crash_with_its_code(sandbox):
    r = sandbox.run("print('before', flush=True)\nimport os\nos._exit(3)")
    assert r.status == "crashed" and r.exit_code == 3 and r.stdout == "before\n"
    still_serves(sandbox)


def test_sys_exit(sandbox):
    r = sandbox.run("import sys\nsys.exit(2)")
    assert r.status == "error" and "SystemExit: 2" in r.stderr
    with sandbox.session() as s:
        assert s.run("y = 5\nimport sys\nsys.exit(0)").status == "ok"
        assert s.run("print(y)").stdout == "5\n"


# --- memory ------------------------------------------------------------------------------------------
def test_memory_bomb_is_reported_and_numpy_still_works(sandbox):
    r = sandbox.run("x = bytearray(8 * 1024**3)")
    assert r.status == "memory" and "MemoryError" in r.stderr
    r = sandbox.run("chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024**2))")
    assert r.status == "memory"
    r = sandbox.run(
        "import numpy as np\na = np.random.default_rng(0).random((500, 500))\n"
        "print(round(float(np.linalg.det(a @ np.linalg.inv(a))), 6))"
    )
    assert (r.status, r.stdout) == ("ok", "1.0\n"), r
