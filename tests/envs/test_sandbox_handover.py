"""A kept state survives its cell: a cell that breaks its own hand-over (its channel closed or
replaced, a timer firing) is rolled back, hooks the code leaves in the state (signal handlers,
trace functions, finalizers of what it put in sys.stdout) do not run in the state's loop, one
the sandbox cannot set aside costs the next call no more than its timeout, and every reset is
noted in the call's result, even when the call succeeds. Each snippet acts on its own
session's processes only."""

from __future__ import annotations

import pytest
from sandboxes import need

SET = "x = 41"
PROBE = "print(x)"

CLOSE_CHANNEL = """
import os, stat
for fd in range(3, 256):
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            os.close(fd)
    except OSError:
        pass
x = 5
"""
REPLACE_CHANNEL = """
import os, stat
null = os.open(os.devnull, os.O_RDWR)
for fd in range(3, 256):
    try:
        if fd != null and stat.S_ISSOCK(os.fstat(fd).st_mode):
            os.dup2(null, fd)
    except OSError:
        pass
x = 5
"""


@pytest.mark.parametrize("attack", [CLOSE_CHANNEL, REPLACE_CHANNEL], ids=["close", "dup2"])
def test_a_cell_that_breaks_its_channel_is_rolled_back(sandbox, attack):
    with sandbox.session() as s:
        assert s.run(SET).ok
        r = s.run(attack)
        assert r.status == "crashed" and "closed or replaced its channel" in r.stderr, r
        r = s.run(PROBE)
        assert (r.status, r.stdout, r.stderr) == ("ok", "41\n", ""), r  # the state before it


def test_a_timer_that_fires_in_the_hand_over_does_not_lose_the_state(sandbox):
    """SIGALRM's default action ends a process: fired during the hand-over, after the old state
    is gone, it would take the new state with it. The hand-over blocks every signal."""
    with sandbox.session() as s:
        for _ in range(5):
            assert s.run(SET).ok
            s.run("import signal\nsignal.setitimer(signal.ITIMER_REAL, 0.001, 0.0001)\nx = 5")
            r = s.run(PROBE)  # the new state, or (had it fired in the code) the old one
            assert r.status == "ok" and r.stdout in ("5\n", "41\n") and not r.stderr, r


HOOKS = {
    "sigcont handler": "import signal, time\n"
    "signal.signal(signal.SIGCONT, lambda *a: time.sleep(600))",
    "sigchld handler": "import signal, time\n"
    "signal.signal(signal.SIGCHLD, lambda *a: time.sleep(600))",
    "stdout finalizer": """
import sys, time
class Sink:
    def write(self, s):
        return len(s)
    def flush(self):
        pass
    def __del__(self):
        time.sleep(600)
sys.stdout = Sink()
""",
    "profile function": "import sys, time\n"
    "sys.setprofile(lambda f, ev, arg: time.sleep(600) if 'recv' in str(arg) else None)",
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hook", HOOKS.values(), ids=HOOKS.keys())
def test_hooks_left_in_a_state_do_not_run_in_its_loop(sandbox, hook):
    with sandbox.session() as s:
        assert s.run(SET).ok
        s.run(hook)
        assert s.run("raise ValueError('a discarded cell')", timeout_s=3.0).status == "error"
        r = s.run(PROBE, timeout_s=3.0)  # the rollback and the forks ran none of the hooks
        assert (r.status, r.stdout, r.stderr) == ("ok", "41\n", ""), r


@pytest.mark.timeout(120)
def test_a_state_held_up_by_the_code_costs_the_next_call_its_timeout_and_is_noted(sandbox):
    """A hook the sandbox cannot set aside (here the code replaced a function the state's loop
    calls): the next call waits for the state within its own timeout, then the session is reset,
    with a note; the call after it runs in the fresh session. (With a wait not bounded by the
    call, this test would hang on the 600 s sleep until its pytest timeout.)"""
    with sandbox.session() as s:
        assert s.run(SET).ok
        assert s.run("import socket, time\nsocket.recv_fds = lambda *a: time.sleep(600)").ok
        r = s.run(PROBE, timeout_s=2.0)
        assert r.status == "crashed" and "within its timeout" in r.stderr, r
        assert "state was reset" in r.stderr and "ran in a fresh session" not in r.stderr, r
        r = s.run(PROBE)
        assert r.status == "error" and "NameError" in r.stderr, r
        assert s.run("x = 7\nprint(x)").stdout == "7\n"


def test_a_reset_is_noted_in_a_call_that_succeeds(sandbox):
    need(sandbox, "state_untouchable")
    relimit = """
import os, resource
resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (16, 16))
raise RuntimeError("discard me")
"""
    with sandbox.session() as s:
        assert s.run(SET).ok
        assert s.run(relimit).status == "error"
        r = s.run("print('fine')")  # succeeds, in a fresh state: and says so
        assert r.status == "ok" and r.stdout == "fine\n", r
        assert "changed its state's scheduling or limits; state was reset" in r.stderr, r
        assert "ran in a fresh session" in r.stderr, r


def test_the_codes_hooks_are_back_in_its_next_cells(sandbox):
    """Set aside in the state only: a handler, a profile function and a blocked signal of the
    code's act in its later cells as they would in a notebook."""
    with sandbox.session() as s:
        assert s.run("""
import os, signal, sys
seen = []
signal.signal(signal.SIGUSR1, lambda *a: seen.append("usr1"))
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
sys.setprofile(lambda *a: None)
""").ok
        for _ in range(2):
            r = s.run("""
os.kill(os.getpid(), signal.SIGUSR1)
print(seen.pop(), signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, []),
      sys.getprofile() is not None)
""")
            assert r.stdout == "usr1 True True\n", r
