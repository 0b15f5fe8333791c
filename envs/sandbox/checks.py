"""What the supervisor P checks against the kernel before it believes the code's processes.

The state S and the cell C run the code, which can read this package and speak its protocol, so
what they claim is checked here: that an announced cell is one (`announced_cell`), that a cell
that says it has made itself the state left no other process of the code alive
(`promotion_holds`), that a state that says it has rolled back did (`rollback_holds`), and
whether a discarded cell was the only process of the code (`cell_was_alone`); and that a kept
state is as its discarded cell found it (`StateAttributes`). The kernel's lists
of children are read in the order in which orphans move up (cell, state, P): a process that is
re-parented while they are read is seen in the later list. Pids are as P's /proc names them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
import socket
import stat
import time

from .linux import read_proc
from .processes import (
    all_stopped,
    children,
    parent_of,
    pid_of_pidfd,
    pidfd_signal,
    scheduling,
    set_scheduling,
)

STOP_S = 0.5  # a cell stopped to check its promotion stops within this


@dataclasses.dataclass
class ReadyCell:
    """P's handles on the state's forked, waiting cell process (checked by `announced_cell`)."""

    chan: socket.socket | None  # None once it is the new state's channel
    pidfd: int  # -1 once it is the new state's
    out_r: int
    err_r: int
    proc_pid: int  # its pid, read from its pidfd

    def channel(self) -> socket.socket:
        """`chan`, while the cell has not become the state."""
        assert self.chan is not None, "the cell's channel is the state's now"
        return self.chan

    def close(self) -> None:
        if self.chan is not None:
            self.chan.close()
        for fd in (self.pidfd, self.out_r, self.err_r):
            if fd >= 0:
                os.close(fd)


def announced_cell(chan: socket.socket, fds: list[int], state_pid: int | None) -> ReadyCell | None:
    """The announced cell, if the kernel confirms the announcement: a pidfd of a live child of
    the state, and the read ends of two pipes. None (everything closed) otherwise."""
    proc_pid = None
    try:
        if len(fds) == 3 and _is_pipe_read_end(fds[1]) and _is_pipe_read_end(fds[2]):
            proc_pid = pid_of_pidfd(fds[0])  # None for a descriptor that is no pidfd
    except OSError:
        pass
    if proc_pid is None or proc_pid == state_pid or parent_of(proc_pid) != state_pid:
        chan.close()
        for fd in fds:
            os.close(fd)
        return None
    return ReadyCell(chan, fds[0], fds[1], fds[2], proc_pid)


def promotion_holds(
    cell: ReadyCell, state_pidfd: int | None, state_pid: int | None, own_pid: int
) -> bool:
    """Check a cell's claim to be the new state, which only it made: end the old state, stop the
    cell (so that it creates nothing more), and ask the kernel's lists of children whether any
    other process of the code is still alive. A cell that promotes itself ends every other
    process of the session before it says so; one that only says so does not. The cell stays
    stopped."""
    pidfd_signal(state_pidfd, signal.SIGKILL)
    if not pidfd_signal(cell.pidfd, signal.SIGSTOP):
        return False
    give_up, pause = time.monotonic() + STOP_S, 20e-6
    while not all_stopped(cell.proc_pid):
        if time.monotonic() > give_up:
            return False
        time.sleep(pause)  # precise: P's timer slack is 1 us
        pause = min(2 * pause, 160e-6)  # few wake-ups for a stop that takes ~0.1-0.3 ms
    c, s = cell.proc_pid, state_pid
    of_cell = children(c)
    of_state = children(s, {c}) if s is not None else None  # None: gone, its children are P's
    of_self = children(own_pid, {c} if s is None else {c, s})
    return (
        of_cell == set()
        and (of_state is None or of_state <= {c})
        and of_self is not None
        and of_self <= {c, s}
    )


def rollback_holds(cell_pid: int | None, state_pid: int | None, own_pid: int) -> bool:
    """Whether no process of the code is alive but the state (the cell killed, and all it
    started)."""
    if state_pid is None:
        return False
    of_cell = children(cell_pid) if cell_pid is not None else set()
    of_state = children(state_pid, set())
    of_self = children(own_pid, {state_pid})
    return (
        (of_cell is None or of_cell == set())
        and of_state == set()
        and of_self is not None
        and of_self <= {state_pid}
    )


def cell_was_alone(cell: ReadyCell, state_pid: int | None, own_pid: int) -> bool:
    """Kill the discarded cell C and tell whether it was the only process of the code. After
    SIGKILL, C can create no process; whatever it created before is, as the kernel lists
    children, a child of C, a child of the state S (clone with CLONE_PARENT), or an orphan
    adopted by the supervisor (the subreaper). If all three lists are empty but for the expected
    members, nothing needs the state's scoped kill before the caller is answered."""
    if not pidfd_signal(cell.pidfd, signal.SIGKILL) or state_pid is None:
        return False
    c, s = cell.proc_pid, state_pid
    of_cell, of_state = children(c), children(s, {c})
    of_self = children(own_pid, {s})
    return (
        of_cell == set()
        and of_state is not None
        and of_state <= {c}
        and of_self is not None
        and of_self <= {s}
    )


def _is_pipe_read_end(fd: int) -> bool:
    return (
        stat.S_ISFIFO(os.fstat(fd).st_mode)
        and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    )


@dataclasses.dataclass(frozen=True)
class StateAttributes:
    """What a cell can change in a kept state of its own uid without tracing it: the state's
    scheduling (nice value, CPU affinity, policy) and its limits. Read before the state's first
    cell runs; `restored` after each rollback."""

    pid: int  # as P's pid namespace names it, for system calls
    proc_pid: int  # as P's /proc names it
    scheduling: tuple
    limits: bytes  # /proc/<pid>/limits

    @classmethod
    def read(cls, pidfd: int | None, proc_pid: int | None) -> StateAttributes | None:
        if pidfd is None:  # no state
            return None
        pid = pid_of_pidfd(pidfd, own_namespace=True)
        if pid is None or proc_pid is None:
            return None
        try:
            return cls(pid, proc_pid, scheduling(pid), read_proc(f"/proc/{proc_pid}/limits"))
        except OSError:
            return None

    def restored(self) -> bool:
        """Put the scheduling back as it was read; False if that fails, or if the limits changed
        (a lowered hard limit goes up only with CAP_SYS_RESOURCE, which P does not count on)."""
        try:
            if scheduling(self.pid) != self.scheduling:
                set_scheduling(self.pid, self.scheduling)
            return read_proc(f"/proc/{self.proc_pid}/limits") == self.limits
        except OSError:
            return False
