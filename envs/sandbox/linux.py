"""Linux primitives the server side uses: namespaces, mounts, prctl, rlimits, a lean fork, pidfds,
cleanup by scoped kill, and readers of /proc. Standard library only (ctypes for what Python 3.11's
os module lacks)."""

from __future__ import annotations

import _thread
import ctypes
import ctypes.util
import os
import random
import resource
import signal
import time

# PyDLL: calls keep the GIL, as os.fork() does (`lean_fork`); every caller is single-threaded.
libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
PR_SET_DUMPABLE, PR_SET_NAME, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 4, 15, 36, 38

CLOSED_TMP_DIRS = ("/tmp", "/var/tmp")  # root-owned 755: code writes in its scratch dir only
SHARED_TMP_DIRS = ("/dev/shm", "/run/lock")  # sticky 1777 (POSIX semaphores live in /dev/shm),
# emptied of a session's files whenever the session is reset or closed


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# -- namespaces, mounts, process attributes --------------------------------------------------------
def unshare(flags: int) -> None:
    check(libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    check(libc.setns(fd, nstype), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
          f"mount {target}")


def prctl(option: int, arg: int) -> None:
    check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def set_name(name: bytes) -> None:
    """The process's name as `ps` and `top` show it (at most 15 bytes)."""
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


# -- resource limits -------------------------------------------------------------------------------
def limit_resources(memory_mb: int, max_file_mb: int, max_processes: int, max_open_files: int,
                    cpu_s: int) -> None:
    """Hard limits (soft = hard, so the code cannot raise them) of this process and its children;
    no core dumps."""
    mb = 1 << 20
    for res, value in ((resource.RLIMIT_AS, memory_mb * mb),
                       (resource.RLIMIT_FSIZE, max_file_mb * mb),
                       (resource.RLIMIT_NPROC, max_processes),
                       (resource.RLIMIT_NOFILE, max_open_files),
                       (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_CPU, cpu_s)):
        resource.setrlimit(res, (value, value))


def set_cpu_limit(soft_s: int | None) -> None:
    """This process's soft CPU-time limit (SIGXCPU when reached), under the hard one; None sets
    it back to the hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (hard if soft_s is None else soft_s, hard))


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
def kill_all_but_self(wait: bool = True, timeout_s: float = 2.0) -> None:
    """SIGKILL every process this process may signal, except itself and the namespace's init.

    Only called where that set is the session's own processes (own pid namespace, or own uid).
    A process with SIGKILL pending never runs another instruction of its code, so the hot paths
    return without waiting for the kernel to tear the address spaces down (`wait=False`); the
    session's init reaps them. `wait=True` also waits until they are gone from the process table.
    Zombie children of this process are reaped either way."""
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
        return -sig, f"the process was killed by signal {sig} ({signal.Signals(sig).name})"
    code = os.WEXITSTATUS(wait_status)
    return code, f"the process exited with code {code}"


# -- /proc -----------------------------------------------------------------------------------------
def own_proc_pid() -> int:
    """This process's pid as the /proc it sees names it (its pid namespace may be a nested one)."""
    return int(os.readlink("/proc/self"))


def pid_of_pidfd(pidfd: int) -> int | None:
    """The pid of a pidfd's process as /proc names it (its pid namespace may be a nested one)."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError):
        pass
    return None


def read_proc(path: str) -> bytes:
    """A /proc file's whole text (raw os calls: this sits on a call's critical path)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def children(pid: int, expected: set[int] = frozenset()) -> set[int] | None:
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
    """A zombie (it ran to its end and creates nothing more), or already reaped."""
    try:
        return read_proc(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True
