"""The session supervisor P: owns one session's processes and answers its caller's calls.

P is forked from the server (pid 1 of the session's own pid namespace where the machine allows;
root) and enters the session's jail (jail.py: namespaces, filesystems and a memory cgroup of its
own) and an empty session keyring. It forks the state process S (`state.py`), which forks each
call's cell process C (`cell.py`). P keeps the next call's C forked and announced
(`Session.prepare`), so that a call (`Session.run`) is a few steps: send the waiting C its code
(`_order`), drain C's output while waiting for its status (`_wait`), keep C as the new state or
discard it (`_keep_or_discard`), and answer (`_reply`). What can wait until the caller has its
answer (a deferred rollback, a stateless call's fresh filesystems, the next fork) happens in
`Session.finish`.

S and C run code, so P believes nothing they say without checking it: every read has a deadline
and a size limit (protocol.py), and each claim (an announced cell, a promotion, a rollback) is
checked against the kernel (checks.py). A state that has run code is stopped (SIGSTOP) except
while it forks, so threads that the code left in it do not run between calls.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time

from .checks import (
    ReadyCell,
    StateAttributes,
    announced_cell,
    cell_was_alone,
    promotion_holds,
    rollback_holds,
)
from .jail import SessionJail, isolate_session
from .linux import (
    PR_SET_CHILD_SUBREAPER,
    PR_SET_TIMERSLACK,
    join_fresh_session_keyring,
    prctl,
    set_name,
)
from .output import OutputBuffer, drain
from .processes import describe, kill_as, own_proc_pid, pid_of_pidfd, pidfd_signal, reap_children
from .protocol import (
    Attach,
    BadMessage,
    CellDone,
    CellReady,
    Fork,
    ForkFailed,
    Promote,
    Promoted,
    ProtocolError,
    Result,
    Rollback,
    RolledBack,
    Run,
    RunCell,
    recv,
    send,
)
from .state import state_process

PROMOTION_MARGIN_S = 0.05  # a cell promotes itself only this long before its deadline or earlier
PROMOTE_GRACE_S = 0.25  # a cell asked to promote itself after its deadline answers within this
READY_S = 10.0  # a state forks and its cell announces itself within this
ROLLBACK_S = 2.0  # a state rolls back within this


class Session:
    """Runs in P: owns the session's state process and answers the caller's orders."""

    def __init__(self, settings: dict, uid: int | None, scoped: bool):
        self.uid, self.scoped = uid, scoped
        self.is_init = settings["pid_namespace"] and os.getpid() == 1
        self.jail = SessionJail(settings, uid)
        self.settings = self.jail.settings  # with the memory cgroup that the state joins
        self.state: socket.socket | None = None
        self.state_pidfd: int | None = None
        self.state_proc_pid: int | None = None  # pids as /proc names them
        self.state_ran_code = False  # a promoted cell: its threads are the code's
        self.state_stopped = False
        self.state_attributes: StateAttributes | None = None  # a kept state's, once read
        self.cell: ReadyCell | None = None
        self.lost: str | None = None  # why the state was last reset, for the next call's notes
        self.rollback_due = False  # a discarded cell's rollback, left for after the reply
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
                state_process(theirs, self.settings, self.uid, self.jail.scratch, self.scoped)
            finally:
                os._exit(1)
        theirs.close()
        pidfd = os.pidfd_open(pid)
        self.set_state(mine, pidfd, pid_of_pidfd(pidfd), ran_code=False)

    def set_state(
        self, chan: socket.socket, pidfd: int, proc_pid: int | None, ran_code: bool
    ) -> None:
        if self.state is not None:
            self.state.close()
        if self.state_pidfd is not None:
            os.close(self.state_pidfd)
        self.state, self.state_pidfd, self.state_proc_pid = chan, pidfd, proc_pid
        self.state_ran_code, self.state_stopped = ran_code, False
        self.state_attributes = None

    def state_channel(self) -> socket.socket:
        """The state's channel, where the caller knows there is a state."""
        assert self.state is not None, "the session has no state process"
        return self.state

    def state_trusted(self) -> bool:
        """Whether no code can have touched the state: the pristine state, of another uid than
        the code's."""
        return not self.state_ran_code and self.uid is not None

    def wake_state(self) -> None:
        if self.state_stopped:
            pidfd_signal(self.state_pidfd, signal.SIGCONT)
            self.state_stopped = False

    def stop_state(self) -> None:
        """Stop a state that has run code, so that its threads do not run until it is needed."""
        if self.state_ran_code and not self.state_stopped:
            self.state_stopped = pidfd_signal(self.state_pidfd, signal.SIGSTOP)

    def prepare(self, reap: bool = False, warm: bool = True) -> None:
        """Have a cell process forked, announced and checked for the next call (a state first, if
        there is none), warmed up if `warm`; then stop the state. A state that cannot fork (at
        its process limit for longer than the patience of `processes.fork_when_possible`), or whose
        announcement does not hold, is replaced by a fresh one, once; `lost` says why, for the
        next call's notes."""
        for _ in range(2):
            if self.cell is not None:
                return
            if self.state is None:
                self.spawn_state()
            self.wake_state()
            mine, theirs = socket.socketpair()
            try:
                send(self.state_channel(), Fork(reap, warm), fds=[theirs.fileno()])
                theirs.close()
                ready, _, fds = recv(
                    mine, CellReady, ForkFailed, deadline=time.monotonic() + READY_S
                )
            except (ProtocolError, OSError):
                theirs.close()
                mine.close()
                self.lost = "the session's state process was gone; state was reset"
                self.kill_all()
                continue
            finally:
                reap = False  # a fresh state has no cell to forget
            if isinstance(ready, ForkFailed):
                mine.close()
                self.lost = f"{ready.error}; state was reset"
                self.kill_all()
                continue
            self.cell = announced_cell(mine, fds, self.state_proc_pid)
            if self.cell is None:
                self.lost = "the session's state announced a cell that is not one; state was reset"
                self.kill_all()
                continue
            self.stop_state()

    def kill_all(self) -> None:
        """SIGKILL every process of the session but this supervisor; no state survives."""
        if self.cell is not None:
            pidfd_signal(self.cell.pidfd, signal.SIGKILL)
            self.cell.close()
            self.cell = None
        pidfd_signal(self.state_pidfd, signal.SIGKILL)  # the pristine state may be of another uid
        if self.state is not None:
            self.state.close()
            self.state = None
        if self.state_pidfd is not None:
            os.close(self.state_pidfd)
        self.state_pidfd = self.state_proc_pid = None
        self.state_ran_code = self.state_stopped = self.rollback_due = False
        self.state_attributes = None
        if self.is_init:  # pid 1 of the session's own namespace: kill(-1) reaches only it
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif self.scoped:  # a helper with the session's uid does it
            assert self.uid is not None  # scoped, yet not the init of a pid namespace: by uid
            kill_as(self.uid)

    def ready_cell(self, notes: list[str], keep: bool) -> ReadyCell | None:
        """The waiting cell process (normally forked and announced long before this call); None,
        with a note saying why, if there is none to be had."""
        if self.cell is None:
            self.prepare()
        if self.lost is not None:
            notes.append(self.lost)
            if keep:
                notes.append("the previous state was lost; this cell ran in a fresh session")
            self.lost = None
        return self.cell

    # -- one call ---------------------------------------------------------------------------------
    def run(self, code: bytes, timeout_s: float, keep: bool) -> tuple[Result, bytes]:
        """One cell. With keep=False the cell never becomes the state (and the session's files
        are fresh afterwards): the next call starts from the same pristine state."""
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
        status, wait_status = self._keep_or_discard(cell, status, promoted, keep, deadline, notes)
        exit_code = None
        if status == "crashed":
            exit_code, why = describe(wait_status)
            notes.append(why)
            if exit_code == -signal.SIGXCPU:
                status, notes[-1] = "timeout", "CPU time limit exceeded"
            elif self.jail.memory_exceeded():
                status, notes[-1] = "memory", "the session's memory limit was exceeded"
        drain(streams)  # what the cell wrote before it ended is in the pipes
        cell.close()
        return self._reply(cell_number, status, wall, exit_code, out, err, notes)

    @staticmethod
    def _order(
        cell: ReadyCell, code: bytes, number: int, cpu_s: int, keep: bool, deadline: float
    ) -> None:
        """Send the waiting cell its code. A cell may promote itself until PROMOTION_MARGIN_S
        before the deadline, when this supervisor would kill it: a cell that finishes later asks
        (Promote)."""
        order = RunCell(number, cpu_s, keep, deadline - PROMOTION_MARGIN_S)
        try:
            send(cell.channel(), order, code)
        except OSError:
            pass  # it died waiting; its pidfd says so in `_wait`

    @staticmethod
    def _wait(cell: ReadyCell, streams: dict, keep: bool, deadline: float) -> tuple[str, bool]:
        """Feed the cell's output to `streams` until the cell reports, ends or reaches the
        deadline, which also bounds the report's read. Returns (status, whether the cell says it
        has promoted itself)."""
        chan = cell.channel()
        poller = select.poll()
        for fd in (cell.out_r, cell.err_r, chan.fileno(), cell.pidfd):
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
                elif fd == chan.fileno():
                    try:
                        done, _, _ = recv(chan, CellDone, deadline=deadline)
                    except BadMessage:
                        return "crashed", False
                    except ProtocolError:
                        poller.unregister(fd)  # closed, cut short or late: wait for its end
                        continue
                    return done.status, done.status == "ok" and keep and done.promoted
                elif fd == cell.pidfd:
                    return "crashed", False

    def _keep_or_discard(
        self,
        cell: ReadyCell,
        status: str,
        promoted: bool,
        keep: bool,
        deadline: float,
        notes: list[str],
    ) -> tuple[str, int | None]:
        """Make a successful cell of a stateful call the new state, if its promotion holds; roll
        the state back from any other. Returns the status ("crashed" if the cell could not be
        kept) and the cell's wait status, where the rollback learnt it."""
        wait_status = None
        if status == "ok" and keep:
            if not promoted:
                try:
                    send(cell.channel(), Promote())
                    recv(
                        cell.channel(),
                        Promoted,
                        deadline=max(deadline, time.monotonic()) + PROMOTE_GRACE_S,
                    )
                    promoted = True
                except (ProtocolError, OSError):
                    pass
            if promoted and promotion_holds(
                cell, self.state_pidfd, self.state_proc_pid, self.own_proc_pid
            ):  # its channel is the state's
                self.set_state(cell.channel(), cell.pidfd, cell.proc_pid, ran_code=True)
                self.state_stopped = True
                cell.chan, cell.pidfd = None, -1
            else:
                status = "crashed"
                notes.append(
                    "the cell could not be kept as the new state"
                    + (" (other processes of it were still running)" if promoted else "")
                    + "; state was reset"
                )
                self.kill_all()
        elif (
            self.state is not None
            and status != "crashed"
            and cell_was_alone(cell, self.state_proc_pid, self.own_proc_pid)
        ):
            self.rollback_due = True  # nothing of the code is left: it can wait for the reply
        elif self.state is not None:
            pidfd_signal(cell.pidfd, signal.SIGKILL)
            wait_status = self.rollback(cell.proc_pid)
            if self.state is None and keep:
                notes.append(self.lost or "the session's state did not roll back; state was reset")
                self.lost = None
        else:
            self.kill_all()
        return status, wait_status

    def rollback(self, cell_proc_pid: int | None) -> int | None:
        """Have the state kill the discarded cell and all it started, and check that it did (a
        state that has run code may not); on any failure, end every process of the session.
        Returns the cell's wait status as the state reports it, if plausible."""
        self.wake_state()
        try:
            send(self.state_channel(), Rollback())
            ack, _, _ = recv(
                self.state_channel(), RolledBack, deadline=time.monotonic() + ROLLBACK_S
            )
        except (ProtocolError, OSError):
            self.kill_all()
            return None
        if not rollback_holds(cell_proc_pid, self.state_proc_pid, self.own_proc_pid):
            self.kill_all()
            return None
        if self.state_attributes is not None and not self.state_attributes.restored():
            self.kill_all()
            self.lost = (
                "the discarded cell changed its state's scheduling or limits; state was reset"
            )
            return None
        ws = ack.wait_status
        return ws if type(ws) is int and 0 <= ws < 1 << 16 else None

    @staticmethod
    def _reply(
        cell_number: int,
        status: str,
        wall: float,
        exit_code: int | None,
        out: OutputBuffer,
        err: OutputBuffer,
        notes: list[str],
    ) -> tuple[Result, bytes]:
        """The caller's Result and payload; on failure, the notes end stderr."""
        stdout, stderr = out.value(), err.value()
        if notes and status != "ok":
            sep = b"\n" if stderr and not stderr.endswith(b"\n") else b""
            stderr += sep + "".join(f"[sandbox] {n}\n" for n in notes).encode()
        result = Result(
            status, wall, out.truncated or err.truncated, exit_code, len(stdout), cell_number
        )
        return result, stdout + stderr

    # -- after the reply --------------------------------------------------------------------------
    def finish(self, keep: bool, warm: bool = True) -> None:
        """After the reply: the deferred rollback, a stateless call's fresh filesystems, and the
        next call's cell process, forked, announced and checked (and warmed up if `warm`)."""
        reap = False
        if self.state_ran_code and self.state_attributes is None:  # before its first cell runs
            self.state_attributes = StateAttributes.read(self.state_pidfd, self.state_proc_pid)
            if self.state_attributes is None:
                self.kill_all()
                self.lost = "the session's state could not be read; state was reset"
        if self.rollback_due:  # the discarded cell was alone: only the state's bookkeeping is left
            self.rollback_due = False
            reap = self.state_trusted()  # then the next Fork does it
            if not reap:
                self.rollback(None)
        if not keep:
            self.jail.fresh_files()
        self.prepare(reap, warm)

    def close(self) -> None:
        self.kill_all()
        self.jail.close()


def session_main(handoff: socket.socket, settings: dict, uid: int | None, scoped: bool) -> None:
    """The body of P: wait to be handed a caller, then serve it until it hangs up."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    prctl(PR_SET_TIMERSLACK, 1)  # short waits (for a cell to stop) last as long as asked
    set_name(b"sandbox-super")
    if settings.get("session_namespaces"):
        isolate_session()
    join_fresh_session_keyring()
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
    caller_waited = False
    try:
        while True:
            try:
                order, code, _ = recv(client, Run)
            except ProtocolError:
                break
            timeout = min(order.timeout_s, float(settings["max_timeout_s"]))
            result, payload = session.run(code, timeout, order.keep)
            send(client, result, payload)
            # Off the caller's path, unless it calls back to back: then it waits for the next
            # cell, and a warm-up would only add to the wait (and to the machine's load).
            session.finish(order.keep, warm=not caller_waited)
            caller_waited = bool(select.select([client], [], [], 0)[0])
    except OSError:
        pass
    finally:
        client.close()
        session.close()
