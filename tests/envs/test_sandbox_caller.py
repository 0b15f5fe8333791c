"""The caller's side of the sandbox: bad input is refused in the caller's process, before anything
is sent, and the session it was meant for goes on; a closed sandbox stays closed; a session's
close() returns once its processes are gone."""

import os

import pytest
from sandboxes import FAST

from toolgrpo.envs.sandbox import PythonSandbox
from toolgrpo.envs.sandbox.framing import MAX_PAYLOAD


def test_code_larger_than_a_message_is_the_callers_error_and_the_session_goes_on(sandbox):
    with sandbox.session() as s:
        assert s.run("x = 41").ok
        with pytest.raises(ValueError, match=f"at most {MAX_PAYLOAD}"):
            s.run("#" * (MAX_PAYLOAD + 1))
        with pytest.raises(ValueError, match="bytes in UTF-8"):
            s.run("é" * (MAX_PAYLOAD // 2 + 1))  # two bytes each: over by its encoding
        assert s.run("print(x + 1)").stdout == "42\n"  # the state is still there
    with pytest.raises(ValueError, match=f"at most {MAX_PAYLOAD}"):
        sandbox.run("#" * (MAX_PAYLOAD + 1))


@pytest.mark.parametrize(
    "timeout,error",
    [
        ("3", TypeError),
        (True, TypeError),
        ([1], TypeError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (0, ValueError),
        (-1.0, ValueError),
        (FAST.max_timeout_s + 1, ValueError),
    ],
)
def test_timeouts_must_be_finite_seconds_in_range(sandbox, timeout, error):
    with sandbox.session() as s:
        assert s.run("x = 1").ok
        with pytest.raises(error, match="timeout_s"):
            s.run("print(x)", timeout_s=timeout)
        with pytest.raises(error, match="timeout_s"):
            sandbox.run("print(1)", timeout_s=timeout)
        assert s.run("print(x)", timeout_s=2).stdout == "1\n"


def test_a_closed_sandbox_stays_closed():
    sb = PythonSandbox(FAST)
    assert sb.run("print(1)").ok and sb.pid is not None
    sb.close()
    for use in (lambda: sb.run("print(1)"), sb.session, sb.start):
        with pytest.raises(RuntimeError, match="this PythonSandbox is closed"):
            use()
    assert sb.pid is None  # no new server was started
    sb.close()  # a second close is harmless


def holding(name: str) -> set[int]:
    """Host pids with an open file whose path ends with `name` (read from /proc, never signalled)."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}").endswith(name):
                    found.add(int(entry))
            except OSError:
                pass
    return found


def test_session_close_returns_once_its_processes_are_gone(sandbox):
    """The session's state holds a file open (so does the next call's cell, forked from it):
    once close() returns, no process holds it."""
    name = "toolgrpo-close-wait-4e1f"
    s = sandbox.session()
    assert s.run(f"f = open({name!r}, 'w')").ok
    assert s.run("print(f.closed)").stdout == "False\n"
    if not holding(name):
        pytest.skip("this machine's /proc does not show the sandbox's descriptors")
    s.close()
    assert holding(name) == set()  # at once: close() waited for the processes
