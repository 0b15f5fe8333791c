"""The state process S: holds a session's globals, and forks each call's cell process from them."""

from __future__ import annotations

import builtins
import os
import signal
import socket
import sys

from .cell import cell_process, run_cell, text_stream
from .cgroups import join_cgroup
from .linux import PR_SET_NO_NEW_PRIVS, deny_keyrings, limit_resources, prctl, set_name
from .processes import (
    alive,
    fork_when_possible,
    in_nested_pid_namespace,
    kill_all_but_self,
    kill_as,
    reap_children,
)
from .protocol import BadMessage, Fork, ForkFailed, ProtocolError, Rollback, RolledBack, recv, send

WARM_UP = (
    "import math, numpy, sympy\n"
    "print(1 + 1, math.gcd(12, 18), numpy.arange(3).sum(), sympy.Integer(6))"
)
"""Run once per session, before its first cell: lazy imports and caches the cells then share."""


def state_process(ctl: socket.socket, limits: dict, uid: int | None, scratch: str, scoped: bool):
    """Sets the limits, then serves the supervisor's orders: Fork a cell process (announced with
    a channel of its own) that waits for the next cell, and Rollback (kill the cell and all it
    started). A promoted cell continues this loop as the new state. The supervisor orders the
    fork once its caller has the previous result, so that the fork does not compete with it.

    The first state of a session, which no code has run in, keeps the supervisor's uid (root)
    where sessions have a uid of their own: each cell drops to the session's uid right after the
    fork (`cell.cell_process`), so no cell can signal, renice, re-limit or trace the pristine state
    that the next call forks from. A promoted cell, the state of a session that keeps state, has
    the session's uid, like the cells it forks: it is the code's own process. The state's working
    directory is "/", so that it keeps no scratch filesystem of a past call alive; cells enter the
    session's scratch directory by its path."""
    os.setsid()
    set_name(b"sandbox-state")
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.closerange(3, ctl.fileno())
    os.closerange(ctl.fileno() + 1, 1 << 16)
    limit_resources(
        limits["memory_mb"],
        limits["max_file_mb"],
        limits["max_processes"],
        limits["max_open_files"],
        cpu_s=int(limits["max_timeout_s"]) + 2,
    )
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file past the cap raises OSError(EFBIG)
    if limits.get("cgroup"):  # the session's memory cgroup: every later fork is in it too
        join_cgroup(limits["cgroup"])
    prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries cannot raise privileges
    deny_keyrings()  # no cell reaches a keyring (linux.deny_keyrings); inherited by every fork
    os.chdir("/")
    os.environ.update(HOME=scratch, TMPDIR=scratch)
    sys.stdout = sys.stderr = text_stream(1, False)  # /dev/null until a cell rebinds them
    run_cell(WARM_UP, {"__builtins__": builtins}, 0)
    sys.stdout.flush()
    ns = {"__name__": "__main__", "__builtins__": builtins}
    cell_pid = 0
    while True:
        try:
            order, _, fds = recv(ctl, Fork, Rollback)
        except BadMessage:
            os._exit(1)
        except ProtocolError:
            os._exit(0)  # the supervisor is gone, or a promoted cell killed this old state
        if isinstance(order, Fork) and (order.reap or not cell_pid) and len(fds) == 1:
            reap_children()  # the previous cell, if it has ended (else at a later fork)
            cell_pid = fork_when_possible()
            if cell_pid == 0:
                ctl.close()
                ctl = cell_process(
                    socket.socket(fileno=fds[0]), ns, scoped, uid, scratch, order.warm
                )
                continue  # this process is now the state
            if cell_pid is None:  # the answer to the order goes where the cell's would have
                cell_pid = 0
                with socket.socket(fileno=fds[0]) as chan:
                    send(
                        chan,
                        ForkFailed(
                            "the session's state could not fork the call's "
                            "process: its process limit is reached"
                        ),
                    )
            else:
                os.close(fds[0])
        elif isinstance(order, Rollback) and cell_pid:
            status = reap_children(watch_pid=cell_pid)  # set if the cell had already ended
            if scoped and uid is not None and os.getuid() != uid and not in_nested_pid_namespace():
                kill_as(uid)  # the pristine state is root: kill(-1) as the session's uid
            elif scoped:
                kill_all_but_self(wait=False)
            elif alive(cell_pid):
                os.killpg(cell_pid, signal.SIGKILL)
            cell_pid = 0
            send(ctl, RolledBack(status))
        else:
            os._exit(1)
