"""The cell process C: a fork of the session's state that runs one snippet in its namespace, and
becomes the new state if the snippet succeeds (and the session keeps state)."""

from __future__ import annotations

import ast
import builtins
import io
import linecache
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any

from .linux import (
    CELL_OOM_SCORE_ADJ,
    PR_SET_DUMPABLE,
    prctl,
    set_cpu_limit,
    set_name,
    set_oom_score_adj,
)
from .processes import kill_all_but_self, own_proc_pid
from .protocol import (
    CellDone,
    CellReady,
    Message,
    Promote,
    Promoted,
    ProtocolError,
    RunCell,
    recv,
    rehearse,
    send,
)

SPARE_WARM_UP = "squares = [i * i for i in range(8)]\nprint(sum(squares), 'ok')\nsquares"
"""What C runs while it waits for its cell: the copy-on-write faults of running a cell, taken
before the call."""


def run_cell(code: str, ns: dict, cell: int) -> str:
    """Execute `code` like a notebook cell; the value of a final expression is printed. Returns
    "ok", "error" or "memory". Tracebacks go to stderr and only show frames of the cells, with
    line numbers that refer to the snippet."""
    filename = f"<cell {cell}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
        tree = ast.parse(code, filename, "exec")
        last = None
        final = tree.body[-1] if tree.body else None
        if isinstance(final, ast.Expr):
            tree.body.pop()
            last = ast.Expression(final.value)
        exec(compile(tree, filename, "exec"), ns)  # noqa: S102 - running the snippet is the job
        if last is not None:
            value = eval(compile(last, filename, "eval"), ns)
            if value is not None:
                print(repr(value))
        return "ok"
    except SystemExit as exc:
        if exc.code in (None, 0):
            return "ok"
        print(f"SystemExit: {exc.code}", file=sys.stderr)
        return "error"
    except BaseException as exc:  # noqa: BLE001 - anything the snippet raises is reported
        tb = exc.__traceback__
        while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell "):
            tb = tb.tb_next
        try:
            sys.stderr.write("".join(traceback.format_exception(type(exc), exc, tb)))
        except BaseException:  # noqa: BLE001, S110 - a broken stderr must not hide the status
            pass
        return "memory" if isinstance(exc, MemoryError) else "error"


class Hooks:
    """What of the code's would act in the state's own loop between calls: its Python signal
    handlers, its trace and profile functions and its signal mask. A promoted cell sets them
    aside before its hand-over (`set_aside`: signals the code handles are ignored, SIGCHLD has
    its default, no trace or profile function, every signal blocked), so that neither the
    hand-over nor the state's loop runs any of the code's, and no timer the code set ends
    either; each later cell puts them back before its code runs (`restore`)."""

    handlers: dict[int, Any] = {}
    trace = profile = None
    streams: tuple[object, ...] = ()  # the cell's own sys.stdout and sys.stderr
    kept: list[object] = []  # the code's objects it left there: never freed, so never finalized
    mask: Any = None  # None: the pristine state's, as it is

    @classmethod
    def set_aside(cls) -> None:
        cls.mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        cls.trace, cls.profile = sys.gettrace(), sys.getprofile()
        sys.settrace(None)
        sys.setprofile(None)
        cls.handlers = {}
        for sig in signal.valid_signals():
            try:
                handler = signal.getsignal(sig)
            except (OSError, ValueError):
                continue
            if callable(handler):
                cls.handlers[sig] = handler
                signal.signal(sig, signal.SIG_DFL if sig == signal.SIGCHLD else signal.SIG_IGN)

    @classmethod
    def keep_streams(cls) -> None:
        """Hold on to what the code left in sys.stdout and sys.stderr, which the state replaces:
        freed, a finalizer of the code's would run in the hand-over."""
        for stream in (sys.stdout, sys.stderr):
            if not any(stream is own for own in cls.streams):
                cls.kept.append(stream)

    @classmethod
    def restore(cls) -> None:
        for sig, handler in cls.handlers.items():
            signal.signal(sig, handler)
        sys.settrace(cls.trace)
        sys.setprofile(cls.profile)
        if cls.mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, cls.mask)


def channel_intact(chan: socket.socket, identity: tuple[int, int]) -> bool:
    """Whether the cell's channel to its supervisor is still the socket it was given (the code
    may have closed its descriptor, or put another file there)."""
    try:
        st = os.fstat(chan.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == identity


def text_stream(fd: int, line_buffering: bool) -> io.TextIOWrapper:
    return io.TextIOWrapper(
        io.FileIO(fd, "w", closefd=False),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=line_buffering,
    )


def cell_process(
    chan: socket.socket, ns: dict, scoped: bool, uid: int | None, scratch: str, warm: bool = True
) -> socket.socket:
    """The forked child C, made ready before its cell exists: it takes its copy-on-write faults in a
    warm-up run (if `warm`), makes its output pipes, and hands the supervisor its pidfd and their
    read ends, all while the session waits for its caller. Then it runs the cell it is sent. Returns
    its channel if the cell succeeded and C was promoted to be the state; otherwise never returns. A
    cell that succeeds with time to spare before the call's deadline promotes itself and says so
    with its status; one that finishes later leaves the choice to the supervisor, which is the one
    to kill it at the deadline.

    C first takes the session's uid (when the state it forks from is the pristine one, still
    root) and enters the scratch directory: the one mounted now, not one of a past call."""
    # the OOM killer of the session's cgroup picks the cell before the state: raising one's own
    # score needs no privilege; the supervisor lowers it again when the cell becomes the state
    set_oom_score_adj("self", CELL_OOM_SCORE_ADJ)
    if uid is not None and os.getuid() != uid:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    os.chdir(scratch)
    set_name(b"sandbox-cell")
    state_pid = os.getppid()
    if warm:
        run_cell(SPARE_WARM_UP, {"__builtins__": builtins}, 0)
        sys.stdout.flush()
        rehearse(RunCell(0, 1, False, 0.0), CellDone("ok"))  # the call's messages, likewise
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(out_w)
    os.close(err_w)
    sys.stdout, sys.stderr = text_stream(1, False), text_stream(2, True)
    Hooks.streams = (sys.stdout, sys.stderr)
    os.setpgid(0, 0)  # killpg(getpgrp()) by the code reaches only C and its children
    # Undumpable, as the change of uid or a kept state made it: the code's own /proc files are
    # root's until it is dumpable again.
    prctl(PR_SET_DUMPABLE, 1)
    pidfd = os.pidfd_open(os.getpid())
    send(chan, CellReady(own_proc_pid()), fds=[pidfd, out_r, err_r])  # pid as P's /proc names it
    for fd in (pidfd, out_r, err_r):
        os.close(fd)
    try:
        order, payload, _ = recv(chan, RunCell)
    except ProtocolError:
        os._exit(0)
    set_cpu_limit(order.cpu_s)
    st = os.fstat(chan.fileno())
    identity = (st.st_dev, st.st_ino)
    Hooks.restore()
    status = run_cell(payload.decode("utf-8", "replace"), ns, order.cell)
    if status == "ok" and order.keep:
        Hooks.set_aside()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001, S110 - a closed stream: nowhere to report to
            pass
    if not channel_intact(chan, identity):  # nothing is killed: the state rolls this cell back
        try:
            os.write(2, b"[sandbox] the cell closed or replaced its channel to the supervisor\n")
        finally:
            os._exit(3)
    if status == "ok" and order.keep and time.monotonic() < order.promote_by:
        return _become_state(chan, CellDone("ok", promoted=True), scoped, state_pid)
    send(chan, CellDone(status))
    try:
        recv(chan, Promote)
    except ProtocolError:
        os._exit(0)
    return _become_state(chan, Promoted(), scoped, state_pid)


def _become_state(chan: socket.socket, answer: Message, scoped: bool, state_pid: int):
    """Promotion: end every other process of the session, detach from the cell's pipes, answer.

    C first joins the old state's process group: the supervisor stops the new state, and a
    stopped process whose group the old state's death orphans would get SIGHUP (which kills it)
    and SIGCONT. (A session of its own, setsid(), would avoid that too, but costs ~2 ms here: the
    kernel makes the new session a scheduler autogroup.)"""
    try:
        os.setpgid(0, os.getpgid(state_pid))
    except OSError:
        pass
    if scoped:
        kill_all_but_self(wait=False)  # the previous state, and everything the code started
    elif os.getppid() == state_pid:  # no scope for kill(-1): end the previous state only
        try:
            os.kill(state_pid, signal.SIGKILL)
        except OSError:
            pass  # a state of another uid: the supervisor ends it
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    set_cpu_limit(None)
    send(chan, answer)
    # Undumpable before it forks a cell: a cell of the same uid then cannot trace the state, nor
    # read or write its memory (ptrace, process_vm_writev, /proc/<pid>/mem all need a dumpable
    # target), so a discarded cell cannot have changed the state it rolls back to.
    prctl(PR_SET_DUMPABLE, 0)
    # fresh streams on /dev/null, whatever the cell left in sys.stdout and sys.stderr
    Hooks.keep_streams()
    sys.stdout, sys.stderr = text_stream(1, False), text_stream(2, True)
    set_name(b"sandbox-state")
    return chan
