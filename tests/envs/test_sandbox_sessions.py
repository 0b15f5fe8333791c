"""PythonSandbox's sessions and its server: state never leaks between sessions or stateless
calls, many threads share one sandbox, close leaves no process, reduced isolation still bounds
time and memory, and the server imports only its own modules and the standard library.
"""

from __future__ import annotations

import os
import threading

import pytest
from sandboxes import FAST, descendants, still_serves, wait_until

from toolgrpo.envs.sandbox import PythonSandbox, SandboxError


# --- isolation between sessions, concurrency, shutdown -----------------------------------------------
def test_state_does_not_leak_between_sessions(sandbox):
    with sandbox.session() as a, sandbox.session() as b:
        a.run("secret = 'alpha'\nopen('mine.txt', 'w').write('alpha')")
        r = b.run("print(secret)")
        assert r.status == "error" and "NameError" in r.stderr
        r = b.run("import os\nprint(os.path.exists('mine.txt'))")
        assert r.stdout == "False\n"
        assert a.run("print(secret)").stdout == "alpha\n"


def test_stateless_calls_share_nothing(sandbox):
    leave = (
        "import os, numpy\nmarker = 1\nnumpy.pi = 3\nopen('left.txt', 'w').write('x')\n"
        "os.mkdir('d')\nopen('/dev/shm/left', 'w').write('x')\n"
        "os.symlink('/etc/passwd', 'link')\nos.chmod('.', 0o500)"
    )
    for _ in range(3):  # stateless calls reuse idle sessions: whichever one runs next
        assert sandbox.run(leave).status == "ok"
        r = sandbox.run(
            "import os, numpy\nprint(sorted(os.listdir('.')), "
            "os.path.exists('/dev/shm/left'), 'marker' in globals(), numpy.pi > 3.1)"
        )
        assert r.stdout == "[] False False True\n", r


def test_concurrent_sessions_from_many_threads(sandbox):
    errors = []

    def worker(k: int):
        try:
            with sandbox.session() as s:
                s.run(f"acc = {k}")
                for i in range(15):
                    r = s.run(f"acc = acc * 2 + {i}\nprint(acc)")
                    assert r.status == "ok", r
                expected = k
                for i in range(15):
                    expected = expected * 2 + i
                assert r.stdout == f"{expected}\n"
                assert sandbox.run(f"print({k} ** 2)").stdout == f"{k * k}\n"
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_close_leaves_no_process_behind():
    sb = PythonSandbox(FAST)
    s = sb.session()
    s.run("import subprocess\nx = 1")
    assert sb._proc is not None  # the session started the server
    tree = {sb._proc.pid} | descendants(sb._proc.pid)  # the server, its pool and the session
    assert len(tree) >= 4
    sb.close()
    alive = lambda: {p for p in tree if os.path.exists(f"/proc/{p}")}
    assert wait_until(lambda: not alive(), 5.0), alive()
    with pytest.raises(SandboxError):  # the session's server is gone
        s.run("print(x)")


def test_reduced_isolation_still_contains_time_and_memory(monkeypatch):
    import toolgrpo.envs.sandbox.client

    monkeypatch.setattr(toolgrpo.envs.sandbox.client, "_warned", False)
    with pytest.warns(UserWarning, match="Off: network_isolated, pid_namespace"):
        sb = PythonSandbox(FAST, isolation="none", pool_size=0).start()
    with sb:
        assert not sb.protections["network_isolated"]
        assert sb.run("while True: pass", timeout_s=1).status == "timeout"
        assert sb.run("x = bytearray(8 * 1024**3)").status == "memory"
        still_serves(sb)


def test_sessions_keep_state_without_a_kill_scope(monkeypatch):
    """No namespaces and no uid of its own (a non-root caller without user namespaces): a cell
    cannot be promoted by killing its whole scope, so it ends the previous state alone."""
    import toolgrpo.envs.sandbox.client
    import toolgrpo.envs.sandbox.launch

    monkeypatch.setattr(toolgrpo.envs.sandbox.client, "_warned", True)
    # the caller looks unprivileged
    monkeypatch.setattr(toolgrpo.envs.sandbox.launch.os, "geteuid", lambda: 1000)
    with PythonSandbox(FAST, isolation="none", pool_size=0) as sb:
        assert not sb.protections["separate_uid"] and not sb.protections["daemon_cleanup"]
        with sb.session() as s:
            assert s.run("x = 41").ok
            r = s.run("x += 1\nprint(x)")
            assert r.status == "ok" and r.stdout == "42\n", r
            assert s.run("x = None\n1 / 0").status == "error"
            assert s.run("print(x)").stdout == "42\n"
        still_serves(sb)


def test_children_lists_live_children_of_every_thread_and_skips_zombies():
    """The kernel facts the rollback shortcut rests on, checked on a tree made here."""
    from toolgrpo.envs.sandbox.processes import children, dead, pid_of_pidfd

    def listed(pid: int, expected=frozenset()) -> set[int]:  # None while a thread of pytest's
        found: list[set[int] | None] = []  # own ends mid-read: read again
        assert wait_until(
            lambda: found.append(children(pid, expected)) or found[-1] is not None, 2.0
        )
        last = found[-1]
        assert last is not None  # what the wait waited for
        return last

    me = int(os.readlink("/proc/self"))
    before = listed(me)
    started = []

    def spawn():  # a child forked by another thread is listed under that thread's task
        started.append(os.posix_spawn("/bin/sleep", ["sleep", "30"], {}))

    t = threading.Thread(target=spawn)
    t.start()
    t.join()
    pid = started[0]
    pidfd = os.pidfd_open(pid)
    try:
        assert pid_of_pidfd(pidfd) == pid
        assert listed(me) - before == {pid} and not dead(pid)
        os.kill(pid, 9)
        assert wait_until(lambda: dead(pid), 2.0)  # a zombie until reaped: no longer listed
        assert pid not in listed(me)
        assert pid in listed(me, expected={pid})  # ...unless expected, zombie or not
    finally:
        os.waitpid(pid, 0)
        os.close(pidfd)
    assert dead(pid) and children(2**22 + 7) is None  # reaped; a pid that does not exist


def test_the_server_imports_its_own_modules_and_the_standard_library_only():
    """The server runs as `python -I` and loads envs/sandbox as the package `sandbox` (see
    server.py): neither envs/__init__.py (Gymnasium) nor the client is imported, and nothing
    outside the standard library is before the preloads."""
    import json
    import subprocess
    import sys

    from toolgrpo.envs.sandbox.launch import SERVER_BOOTSTRAP

    assert SERVER_BOOTSTRAP.endswith("\nmain()\n")
    probe = (
        SERVER_BOOTSTRAP[: -len("main()\n")]
        + "import json\nprint(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    modules = set(json.loads(out.stdout))
    assert {m for m in modules if m.split(".")[0] == "sandbox"} == {
        "sandbox",
        "sandbox.framing",
        "sandbox.protocol",
        "sandbox.linux",
        "sandbox.processes",
        "sandbox.cgroups",
        "sandbox.cell",
        "sandbox.state",
        "sandbox.checks",
        "sandbox.jail",
        "sandbox.output",
        "sandbox.hold",
        "sandbox.supervisor",
        "sandbox.root",
        "sandbox.server",
    }
    assert not {m.split(".")[0] for m in modules} & {
        "envs",
        "toolgrpo",
        "gymnasium",
        "numpy",
        "sympy",
    }


def test_kill_of_every_process_refuses_as_root_outside_a_sandbox_pid_namespace(monkeypatch):
    """kill(-1) by root outside a pid namespace of the sandbox would reach every process of the
    machine: `kill_all_but_self` refuses (os.kill is replaced here, so nothing is sent)."""
    from toolgrpo.envs.sandbox import processes

    if processes.in_nested_pid_namespace():
        pytest.skip("this test process is itself in a nested pid namespace")
    sent = []
    monkeypatch.setattr(processes.os, "geteuid", lambda: 0)
    monkeypatch.setattr(processes.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    with pytest.raises(RuntimeError, match="refusing kill"):
        processes.kill_all_but_self()
    assert sent == []
