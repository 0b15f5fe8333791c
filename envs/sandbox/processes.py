"""Processes as the server side handles them: a lean fork, cleanup by scoped kill, reaping,
pidfds, and the readers of /proc its checks rely on. Standard library only."""

from __future__ import annotations

import _thread
import ctypes
import os
import random
import signal
import time

from .linux import libc, read_proc

PF_EXITING = 0x4  # /proc/<pid>/stat flags: the process has begun to exit


# -- forks -----------------------------------------------------------------------------------------
def lean_fork() -> int:
    """fork() for a process with no other Python thread: the child skips CPython's after-fork
    hooks (threading's bookkeeping and the like), whose writes to memory shared with the parent
    are copied page by page. Those hooks only matter when other threads existed; with any, this
    is `os.fork()`. `random` is reseeded as its own hook would. The GIL stays held across the
    call, as `os.fork()` holds it."""
    if _thread._count():
        return os.fork()
    pid = libc.fork()
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if pid == 0:
        random.seed()
    return pid


def fork_when_possible(patience_s: float = 2.0) -> int | None:
    """`lean_fork()`, retried while this uid is at its process limit (None once `patience_s` is
    over): processes killed at the end of the previous call hold their slots until their parent
    reaps them."""
    deadline = time.monotonic() + patience_s
    while True:
        reap_children()
        try:
            return lean_fork()
        except BlockingIOError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.002)


# -- cleanup ---------------------------------------------------------------------------------------
_nested_pid_namespace = False
"""Set (`remember_nested_pid_namespace`) in a session supervisor before it mounts its own
namespace's /proc, after which /proc can no longer tell; its children inherit it."""


def in_nested_pid_namespace() -> bool:
    """Whether this process's pid namespace differs from that of pid 1 of its /proc (as in a
    session of the sandbox whose /proc is the server's), or was found to before the session's
    own /proc replaced it."""
    if _nested_pid_namespace:
        return True
    try:
        return os.readlink("/proc/self/ns/pid") != os.readlink("/proc/1/ns/pid")
    except OSError:
        return False


def remember_nested_pid_namespace() -> bool:
    """Record, for this process and the ones it forks, whether its pid namespace is nested in
    that of its /proc, before a /proc of its own namespace replaces that one; returns it."""
    global _nested_pid_namespace
    _nested_pid_namespace = in_nested_pid_namespace()
    return _nested_pid_namespace


def kill_as(uid: int) -> None:
    """`kill_all_but_self` in a helper of uid `uid`, for a root process outside a pid namespace
    of its own: it reaches only the processes of that uid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            kill_all_but_self()
        finally:
            os._exit(0)
    while True:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        break


def kill_all_but_self(wait: bool = True, timeout_s: float = 2.0) -> None:
    """SIGKILL every process this process may signal, except itself and the namespace's init.

    Only called where that set is the session's own processes (own pid namespace, or own uid).
    A process with SIGKILL pending never runs another instruction of its code, so the hot paths
    return without waiting for the kernel to tear the address spaces down (`wait=False`); the
    session's init reaps them. `wait=True` also waits until they are gone from the process table.
    Zombie children of this process are reaped either way. As root, it refuses (RuntimeError)
    unless this process is in a pid namespace nested in that of its /proc, since kill(-1) by root
    outside one reaches every process of the machine."""
    if os.geteuid() == 0 and not in_nested_pid_namespace():
        raise RuntimeError("refusing kill(-1) as root outside a pid namespace of the sandbox")
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        reap_children()
        if not wait:
            return
        try:
            os.kill(-1, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            return
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(0.0002)


def reap_all(timeout_s: float = 2.0) -> bool:
    """Reap children until none is left (they have been killed), for `timeout_s` at most; True
    when none is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)


def reap_children(watch_pid: int = 0) -> int | None:
    """Reap exited children without blocking; returns the wait status of `watch_pid` if reaped."""
    watched = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return watched
        if pid == 0:
            return watched
        if pid == watch_pid:
            watched = status


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def describe(wait_status: int | None) -> tuple[int | None, str]:
    """(exit code, or minus the signal number; a sentence) for a wait status."""
    if wait_status is None:
        return None, "the process ended without reporting"
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        return -sig, f"the process was killed by signal {sig} ({name})"
    code = os.WEXITSTATUS(wait_status)
    return code, f"the process exited with code {code}"


# -- /proc -----------------------------------------------------------------------------------------
def own_proc_pid() -> int:
    """This process's pid as the /proc it sees names it (its pid namespace may be a nested one)."""
    return int(os.readlink("/proc/self"))


def pid_of_pidfd(pidfd: int, own_namespace: bool = False) -> int | None:
    """The pid of a pidfd's process as /proc names it (its pid namespace may be a nested one),
    or, with `own_namespace`, as its own pid namespace names it (where system calls of a process
    of that namespace, such as the session's supervisor, take it)."""
    field = "NSpid:" if own_namespace else "Pid:"
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            for line in f:
                if line.startswith(field):
                    pid = int(line.split()[-1])
                    return pid if pid > 0 else None
    except (OSError, ValueError):
        pass
    return None


def scheduling(pid: int) -> tuple:
    """The nice value, CPU affinity and scheduling policy of `pid` (as this process's pid
    namespace names it): what any process of its uid may change without tracing it, and a
    process with CAP_SYS_NICE may put back (`set_scheduling`)."""
    return (
        os.getpriority(os.PRIO_PROCESS, pid),
        os.sched_getaffinity(pid),
        os.sched_getscheduler(pid),
        os.sched_getparam(pid),
    )


def set_scheduling(pid: int, saved: tuple) -> None:
    nice, cpus, policy, param = saved
    os.setpriority(os.PRIO_PROCESS, pid, nice)
    os.sched_setaffinity(pid, cpus)
    os.sched_setscheduler(pid, policy, param)


def pidfd_signal(pidfd: int | None, sig: int) -> bool:
    """Send `sig` through a pidfd (never to a recycled pid); False if there is none to send it
    through or the process is gone."""
    if pidfd is None or pidfd < 0:
        return False
    try:
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except OSError:
        return False


def children(pid: int, expected: set[int] | frozenset[int] = frozenset()) -> set[int] | None:
    """The children of every thread of `pid` that are not zombies, as the kernel lists them
    (members of `expected` are returned without that check); None if `pid` or one of its threads
    vanished while they were read (a caller assumes the worst)."""
    found: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            found.update(map(int, read_proc(f"/proc/{pid}/task/{tid}/children").split()))
    except (OSError, ValueError):
        return None
    return {child for child in found if child in expected or not dead(child)}


def dead(pid: int) -> bool:
    """A process that runs no more code of its own: a zombie, already reaped, one that has begun
    to exit (PF_EXITING), or one with SIGKILL pending (a process cannot hold one off)."""
    try:
        fields = read_proc(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()
        if fields[0] in (b"Z", b"X") or int(fields[6]) & PF_EXITING:
            return True
        for line in read_proc(f"/proc/{pid}/status").splitlines():
            if line.startswith((b"SigPnd:", b"ShdPnd:")) and int(line.split()[1], 16) & (1 << 8):
                return True
        return False
    except (OSError, IndexError, ValueError):
        return True


def all_stopped(pid: int) -> bool:
    """Whether every thread of `pid` is stopped (by a signal, or traced), or the process is
    dead; False if they cannot be read."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            state = read_proc(f"/proc/{pid}/task/{tid}/stat").rsplit(b")", 1)[1].split()[0]
            if state not in (b"T", b"t", b"Z", b"X"):
                return False
        return True
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return False


def parent_of(pid: int) -> int | None:
    """The parent pid of `pid` (as /proc names both), None if it cannot be read."""
    try:
        return int(read_proc(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
