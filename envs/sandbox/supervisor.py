"""The session supervisor P: owns one session's processes and answers its caller's calls.

P is forked from the server (pid 1 of the session's own pid namespace where the machine allows;
root). It forks the state process S (`state.py`), which forks each call's cell process C
(`cell.py`); both run as the session's uid. P keeps the next call's C forked and announced
(`Session.prepare`), so a call only sends C its code, drains C's output pipes, waits for C's
status, and then keeps C as the new state or discards it (`Session.run`). What can wait until
the caller has its answer (a deferred rollback, a stateless call's file reset, the next fork)
happens in `Session.finish`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import select
import shutil
import signal
import socket
import time

from .linux import (PR_SET_CHILD_SUBREAPER, SHARED_TMP_DIRS, children, describe, kill_all_but_self,
                    own_proc_pid, pid_of_pidfd, prctl, reap_children, set_name)
from .protocol import (Attach, BadMessage, CellDone, CellReady, Fork, ForkFailed, Promote,
                       Promoted, ProtocolError, Result, Rollback, RolledBack, Run, RunCell, recv,
                       send)
from .state import state_process

PROMOTION_MARGIN_S = 0.05  # a cell promotes itself only this long before its deadline or earlier


class OutputBuffer:
    """Keeps the first and last `limit // 2` bytes of a stream and counts the rest."""

    def __init__(self, limit: int):
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > 2 * self.tail_limit:
                del self.tail[: len(self.tail) - self.tail_limit]

    @property
    def truncated(self) -> bool:
        return self.total > self.head_limit + self.tail_limit

    def value(self) -> bytes:
        if not self.truncated:
            return bytes(self.head + self.tail)
        tail = self.tail[-self.tail_limit:] if self.tail_limit else b""
        omitted = self.total - len(self.head) - len(tail)
        return bytes(self.head) + f"\n... [{omitted} bytes omitted] ...\n".encode() + bytes(tail)


@dataclasses.dataclass
class ReadyCell:
    """P's handles on the state's forked, waiting cell process."""

    chan: socket.socket | None  # None once it is the new state's channel
    pidfd: int
    out_r: int
    err_r: int
    proc_pid: int | None  # its pid as /proc names it, from its own CellReady (no code had run)

    def close(self) -> None:
        if self.chan is not None:
            self.chan.close()
        for fd in (self.pidfd, self.out_r, self.err_r):
            os.close(fd)


class Session:
    """Runs in P: owns the session's state process and answers the caller's orders."""

    def __init__(self, settings: dict, uid: int | None, scoped: bool):
        self.settings, self.uid, self.scoped = settings, uid, scoped
        self.is_init = settings["pid_namespace"] and os.getpid() == 1
        self.scratch = os.path.join(settings["scratch_root"], f"toolgrpo-sbx-{os.getpid()}-"
                                    f"{random.getrandbits(40):010x}")
        os.makedirs(self.scratch, mode=0o700)
        if uid is not None:
            os.chown(self.scratch, uid, uid)
        self.state: socket.socket | None = None
        self.cell: ReadyCell | None = None
        self.ordered: socket.socket | None = None  # the channel of a cell ordered, not yet ready
        self.rollback_due = False  # a discarded cell's rollback, left for after the reply
        self.state_proc_pid: int | None = None  # pids as /proc names them
        self.own_proc_pid = own_proc_pid()
        self.cells = 0
        signal.signal(signal.SIGCHLD, self._on_child)  # P reaps everything (it is the init)
        self.prepare()

    @staticmethod
    def _on_child(*_):
        reap_children()

    # -- the session's processes ------------------------------------------------------------------
    def spawn_state(self) -> None:
        mine, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            try:
                mine.close()
                state_process(theirs, self.settings, self.uid, self.scratch, self.scoped)
            finally:
                os._exit(1)
        theirs.close()
        pidfd = os.pidfd_open(pid)
        self.set_state(mine, pid_of_pidfd(pidfd))
        os.close(pidfd)

    def set_state(self, chan: socket.socket, proc_pid: int | None) -> None:
        if self.state is not None:
            self.state.close()
        self.state, self.state_proc_pid = chan, proc_pid

    def prepare(self) -> None:
        """Have a cell process forked for the next call (a state first, if there is none). The
        order carries the cell's channel: the state forks and closes its copy, nothing more, as
        whatever it writes while the cell lives costs a copy-on-write fault."""
        if self.state is None:
            self.spawn_state()
        if self.cell is None and self.ordered is None:
            mine, theirs = socket.socketpair()
            try:
                send(self.state, Fork(), fds=[theirs.fileno()])
                self.ordered = mine
            except OSError:  # the state died (its code killed it): the next call starts afresh
                mine.close()
                self.kill_all()
            finally:
                theirs.close()

    def kill_all(self) -> None:
        """SIGKILL every process of the session but this supervisor; no state survives."""
        if self.cell is not None:
            self.cell.close()
            self.cell = None
        if self.ordered is not None:
            self.ordered.close()
            self.ordered = None
        if self.state is not None:
            self.state.close()
            self.state = None
        self.rollback_due, self.state_proc_pid = False, None
        if self.is_init:  # pid 1 of the session's own namespace: kill(-1) reaches only it
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif self.scoped:  # a helper with the session's uid does it
            pid = os.fork()
            if pid == 0:
                try:
                    os.setgid(self.uid)
                    os.setuid(self.uid)
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

    def ready_cell(self, notes: list[str], keep: bool, retry: bool = True) -> ReadyCell | None:
        """The state's waiting cell process (normally forked and announced long before this call);
        None, with a note saying why, if there is none to be had. A state that cannot fork (at
        its process limit for longer than the patience of `linux.fork_when_possible`) is
        replaced by a fresh one, once."""
        if self.cell is not None:
            return self.cell
        if self.state is None and keep:
            notes.append("the previous state was lost; this cell ran in a fresh session")
        self.prepare()
        chan, self.ordered = self.ordered, None
        try:
            if chan is None:
                raise ProtocolError("no state to fork")
            ready, _, fds = recv(chan, CellReady, ForkFailed, timeout_s=10.0)
            if isinstance(ready, ForkFailed):
                chan.close()
                notes.append(f"{ready.error}; state was reset")
                self.kill_all()
                return self.ready_cell(notes, keep, retry=False) if retry else None
            if len(fds) != 3:
                for fd in fds:
                    os.close(fd)
                raise ProtocolError("the cell process did not get ready")
            self.cell = ReadyCell(chan, *fds, ready.proc_pid)
            return self.cell
        except (ProtocolError, OSError):
            if chan is not None:
                chan.close()
            notes.append("the session's state process was gone; state was reset")
            self.kill_all()
            return None

    # -- one call ---------------------------------------------------------------------------------
    def run(self, code: bytes, timeout_s: float, keep: bool) -> tuple[Result, bytes]:
        """One cell. With keep=False the cell never becomes the state (and the caller resets the
        session's files afterwards): the next call starts from the same pristine state."""
        notes: list[str] = []
        cell_number = self.cells + 1 if keep else 1  # a stateless call is always the first cell
        self.cells += keep
        limit = int(self.settings["max_output_bytes"])
        out, err = OutputBuffer(limit), OutputBuffer(limit)
        cell = self.ready_cell(notes, keep)
        t0 = time.monotonic()  # the wall time counts from the order to the cell
        if cell is None:  # nothing ran
            return self._reply(cell_number, "crashed", time.monotonic() - t0, None, out, err, notes)
        self.cell = None  # used up by this call, whatever happens
        deadline = t0 + timeout_s
        streams = {cell.out_r: out, cell.err_r: err}
        self._order(cell, code, cell_number, int(timeout_s) + 1, keep, deadline)
        status, promoted = self._wait(cell, streams, keep, deadline)
        if status == "timeout":
            notes.append(f"timed out after {timeout_s:g} s")
        wall = time.monotonic() - t0
        status, wait_status = self._keep_or_discard(cell, status, promoted, keep, notes)
        exit_code = None
        if status == "crashed":
            exit_code, why = describe(wait_status)
            notes.append(why)
            if exit_code == -signal.SIGXCPU:
                status, notes[-1] = "timeout", "CPU time limit exceeded"
        _drain(streams)  # what the cell wrote before it ended is in the pipes
        cell.close()
        return self._reply(cell_number, status, wall, exit_code, out, err, notes)

    @staticmethod
    def _order(cell: ReadyCell, code: bytes, number: int, cpu_s: int, keep: bool,
               deadline: float) -> None:
        """Send the waiting cell its code. A cell may promote itself until PROMOTION_MARGIN_S
        before the deadline, when this supervisor would kill it: a cell that finishes later asks
        (Promote)."""
        order = RunCell(number, cpu_s, keep, deadline - PROMOTION_MARGIN_S)
        try:
            send(cell.chan, order, code)
        except OSError:
            pass  # it died waiting; its pidfd says so in `_wait`

    @staticmethod
    def _wait(cell: ReadyCell, streams: dict, keep: bool, deadline: float) -> tuple[str, bool]:
        """Feed the cell's output to `streams` until the cell reports, ends or reaches the
        deadline. Returns (status, whether the cell has promoted itself)."""
        poller = select.poll()
        for fd in (cell.out_r, cell.err_r, cell.chan.fileno(), cell.pidfd):
            poller.register(fd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout", False
            for fd, _ in poller.poll(max(1, int(left * 1000))):
                if fd in streams:
                    data = os.read(fd, 1 << 20)
                    if data:
                        streams[fd].feed(data)
                    else:
                        poller.unregister(fd)
                elif fd == cell.chan.fileno():
                    try:
                        done, _, _ = recv(cell.chan, CellDone, timeout_s=2.0)
                    except BadMessage:
                        return "crashed", False
                    except ProtocolError:
                        poller.unregister(fd)  # the code closed its channel; wait for its exit
                        continue
                    return done.status, done.status == "ok" and keep and done.promoted
                elif fd == cell.pidfd:
                    return "crashed", False

    def _keep_or_discard(self, cell: ReadyCell, status: str, promoted: bool, keep: bool,
                         notes: list[str]) -> tuple[str, int | None]:
        """Make a successful cell of a stateful call the new state; roll the state back from any
        other. Returns the status ("crashed" if the cell could not be kept) and the cell's wait
        status, where the rollback learnt it."""
        wait_status = None
        if status == "ok" and keep:
            if not promoted:
                try:
                    send(cell.chan, Promote())
                    recv(cell.chan, Promoted, timeout_s=5.0)
                    promoted = True
                except (ProtocolError, OSError):
                    pass
            if promoted:  # the cell's channel is the new state's
                self.set_state(cell.chan, cell.proc_pid)
                cell.chan = None
            else:
                status = "crashed"
                notes.append("the cell could not be kept as the new state; state was reset")
                self.kill_all()
        elif self.state is not None and status != "crashed" and self.cell_was_alone(cell):
            self.rollback_due = True  # nothing of the code is left: it can wait for the reply
        elif self.state is not None:
            try:
                send(self.state, Rollback())
                ack, _, _ = recv(self.state, RolledBack, timeout_s=5.0)
                wait_status = ack.wait_status
            except (ProtocolError, OSError):
                if keep:
                    notes.append("the session's state process was gone; state was reset")
                self.kill_all()
        return status, wait_status

    @staticmethod
    def _reply(cell_number: int, status: str, wall: float, exit_code: int | None,
               out: OutputBuffer, err: OutputBuffer, notes: list[str]) -> tuple[Result, bytes]:
        """The caller's Result and payload; on failure, the notes end stderr."""
        stdout, stderr = out.value(), err.value()
        if notes and status != "ok":
            sep = b"\n" if stderr and not stderr.endswith(b"\n") else b""
            stderr += sep + "".join(f"[sandbox] {n}\n" for n in notes).encode()
        result = Result(status, wall, out.truncated or err.truncated, exit_code, len(stdout),
                        cell_number)
        return result, stdout + stderr

    def cell_was_alone(self, cell: ReadyCell) -> bool:
        """Kill the discarded cell C and tell whether it was the only process of the code. After
        SIGKILL, C can create no process; whatever it created before is, as the kernel lists
        children, a child of C, a child of the state S (clone with CLONE_PARENT), or an orphan
        adopted by this supervisor (the subreaper). If all three lists are empty but for the
        expected members, nothing needs the state's scoped kill before the caller is answered."""
        try:
            signal.pidfd_send_signal(cell.pidfd, signal.SIGKILL)
        except OSError:
            return False
        c, s = cell.proc_pid, self.state_proc_pid
        if c is None or s is None:
            return False
        of_cell, of_state = children(c), children(s, {c})
        of_self = children(self.own_proc_pid, {s})
        return (of_cell == set() and of_state is not None and of_state <= {c}
                and of_self is not None and of_self <= {s})

    # -- after the reply --------------------------------------------------------------------------
    def finish(self, keep: bool) -> None:
        """After the reply: the deferred rollback, the stateless call's file reset, and the
        order to fork the next call's cell process."""
        if self.rollback_due:
            self.rollback_due = False
            try:
                send(self.state, Rollback())
                recv(self.state, RolledBack, timeout_s=5.0)
            except (ProtocolError, OSError):
                self.kill_all()
        if not keep:
            self.reset_files()
        self.prepare()

    def reset_files(self) -> None:
        """Empty the scratch directory and remove the session's files from the shared temporary
        directories. Every process of the session has been killed by now, so nothing races."""
        _empty_dir(self.scratch)
        os.chmod(self.scratch, 0o700)
        if self.uid is not None:
            os.chown(self.scratch, self.uid, self.uid)
            for d in SHARED_TMP_DIRS:
                _empty_dir(d, owner=self.uid)

    def close(self) -> None:
        self.kill_all()
        if self.uid is not None:
            for d in SHARED_TMP_DIRS:
                _empty_dir(d, owner=self.uid)
        shutil.rmtree(self.scratch, ignore_errors=True)


def _drain(streams: dict) -> None:
    """Feed `streams` what is left in their pipes, without waiting for more."""
    for fd, buf in streams.items():
        os.set_blocking(fd, False)
        try:
            while data := os.read(fd, 1 << 20):
                buf.feed(data)
        except BlockingIOError:
            pass


def _empty_dir(path: str, owner: int | None = None) -> None:
    """Remove the entries of `path` (those of `owner` only, if given) without following links."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for entry in entries:
        try:
            if owner is not None and entry.stat(follow_symlinks=False).st_uid != owner:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass


def session_main(handoff: socket.socket, settings: dict, uid: int | None, scoped: bool) -> None:
    """The body of P: wait to be handed a caller, then serve it until it hangs up."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    set_name(b"sandbox-super")
    session = Session(settings, uid, scoped)
    try:
        _, _, fds = recv(handoff, Attach)
    except ProtocolError:
        fds = []
    handoff.close()
    if not fds:
        session.close()
        return
    client = socket.socket(fileno=fds[0])
    try:
        while True:
            try:
                order, code, _ = recv(client, Run)
            except ProtocolError:
                break
            timeout = min(order.timeout_s, float(settings["max_timeout_s"]))
            result, payload = session.run(code, timeout, order.keep)
            send(client, result, payload)
            session.finish(order.keep)  # off the caller's path
    except OSError:
        pass
    finally:
        client.close()
        session.close()
