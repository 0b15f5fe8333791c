"""The session supervisor P: owns one session's processes and answers its caller's calls.

P is forked from the server (pid 1 of the session's own pid namespace where the machine allows;
root) and enters the session's jail (jail.py: namespaces, filesystems and a memory cgroup of its
own) and an empty session keyring. It forks the state process S (`state.py`), which forks each
call's cell process C (`cell.py`); P's handles on them, and S's phases, are in hold.py. P keeps
the next call's C forked and announced (`StateHold.prepare`), so that a call (`Session.run`) is a few steps: send the waiting C its code
(`_order`), drain C's output while waiting for its status (`_wait`), keep C as the new state or
discard it (`_keep_or_discard`), and answer (`_reply`). What can wait until the caller has its
answer (a deferred rollback, a stateless call's fresh filesystems, the next fork) happens in
`Session.finish`.

S and C run code, so P believes nothing they say without checking it: every read has a deadline
and a size limit (protocol.py), and each claim (an announced cell, a promotion, a rollback) is
checked against the kernel (checks.py). A state that has run code is stopped (SIGSTOP) except
while it forks or rolls back, so threads that the code left in it do not run between calls.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time

from .checks import ReadyCell
from .hold import StateHold
from .jail import SessionJail, isolate_session
from .linux import (
    PR_SET_CHILD_SUBREAPER,
    PR_SET_TIMERSLACK,
    join_fresh_session_keyring,
    prctl,
    set_name,
)
from .output import OutputBuffer, drain
from .processes import describe, pidfd_signal, reap_all, reap_children
from .protocol import (
    Attach,
    BadMessage,
    CellDone,
    Promote,
    Promoted,
    ProtocolError,
    Result,
    Run,
    RunCell,
    recv,
    send,
)

PROMOTION_MARGIN_S = 0.05  # a cell promotes itself only this long before its deadline or earlier
PROMOTE_GRACE_S = 0.25  # a cell asked to promote itself after its deadline answers within this


CLOSE_WAIT_S = 2.0
"""How long a closing session waits for its killed processes to leave the process table."""


class Session:
    """Runs in P: holds the session's processes (`hold`) and answers the caller's orders.

    Between calls the session is ready: its state S has forked the next call's cell C, which
    waits, announced and checked (`StateHold.prepare`). A call (`run`) takes that cell, runs the
    code in it and keeps it as the new state or discards it; the reply goes out; then `finish`
    does what was left for after it and prepares the next cell. `close` ends every process.

    The state S is in one of four phases (`hold.Phase`): NONE (no state process), PRISTINE (a
    fresh state, no code run in it), KEPT (a promoted cell, awake) and STOPPED (a promoted cell,
    stopped between calls). These moves, all made by `StateHold`, are all there are:
      NONE -> PRISTINE        `spawn`: `prepare` forks a state where there is none (the first,
                              or the one after a reset);
      PRISTINE, KEPT or       `promote`: a successful cell of a stateful call whose promotion
        STOPPED -> STOPPED    holds replaces S (it is stopped by the check);
      STOPPED -> KEPT         `wake`: S is to fork the next cell or to roll back;
      KEPT -> STOPPED         `stop`: S has forked the next cell;
      any -> NONE             `kill_all`: S did not answer or could not fork, what it said did
                              not hold (its cell, its rollback) or its attributes could not be
                              read, a cell's promotion did not hold, or the session closes.
    A discarded cell (an error, a timeout, a crash, or any cell of a stateless call) does not
    change what S is: S rolls it back (woken for that), at once or after the reply
    (`StateHold.rollback_due`), or S is reset (`kill_all`).
    """

    def __init__(self, settings: dict, uid: int | None, scoped: bool):
        is_init = settings["pid_namespace"] and os.getpid() == 1
        self.jail = SessionJail(settings, uid)
        self.settings = self.jail.settings  # with the memory cgroup that the state joins
        self.hold = StateHold(self.settings, uid, scoped, is_init, self.jail.scratch)
        self.cells = 0
        signal.signal(signal.SIGCHLD, self._on_child)  # P reaps everything (it is the init)
        self.hold.prepare()

    @staticmethod
    def _on_child(*_):
        reap_children()

    # -- one call ---------------------------------------------------------------------------------
    def run(self, code: bytes, timeout_s: float, keep: bool) -> tuple[Result, bytes]:
        """One cell. With keep=False the cell never becomes the state (and the session's files
        are fresh afterwards): the next call starts from the same pristine state."""
        notes: list[str] = []
        cell_number = self.cells + 1 if keep else 1  # a stateless call is always the first cell
        self.cells += keep
        limit = int(self.settings["max_output_bytes"])
        out, err = OutputBuffer(limit), OutputBuffer(limit)
        deadline = time.monotonic() + timeout_s  # a cell still being forked counts against it
        cell = self.hold.ready_cell(notes, keep, deadline)  # used up by this call, whatever happens
        t0 = time.monotonic()  # the wall time counts from the order to the cell
        if cell is None:  # nothing ran
            return self._reply(cell_number, "crashed", time.monotonic() - t0, None, out, err, notes)
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
        hold = self.hold
        wait_status = None
        if status == "ok" and keep:
            if not promoted:
                promoted = self._ask_to_promote(cell, deadline)
            if not (promoted and hold.promote(cell)):  # its channel is the state's
                status = "crashed"
                notes.append(
                    "the cell could not be kept as the new state"
                    + (" (other processes of it were still running)" if promoted else "")
                    + "; state was reset"
                )
                hold.kill_all()
        elif hold.held and status != "crashed" and hold.cell_was_alone(cell):
            hold.rollback_due = True  # nothing of the code is left: it can wait for the reply
        elif hold.held:
            pidfd_signal(cell.pidfd, signal.SIGKILL)
            wait_status = hold.rollback(cell.proc_pid)
            if not hold.held and keep:
                notes.append(hold.lost or "the session's state did not roll back; state was reset")
                hold.lost = None
        else:
            hold.kill_all()
        return status, wait_status

    @staticmethod
    def _ask_to_promote(cell: ReadyCell, deadline: float) -> bool:
        """Ask a successful cell of a stateful call that did not promote itself (it finished
        within PROMOTION_MARGIN_S of its deadline) to do so; whether it says it has."""
        try:
            send(cell.channel(), Promote())
            recv(
                cell.channel(),
                Promoted,
                deadline=max(deadline, time.monotonic()) + PROMOTE_GRACE_S,
            )
        except (ProtocolError, OSError):
            return False
        return True

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
        """The caller's Result and payload; the notes (a timeout, a reset) end stderr, whatever
        the status: a call that succeeded in a fresh session says so."""
        stdout, stderr = out.value(), err.value()
        if notes:
            sep = b"\n" if stderr and not stderr.endswith(b"\n") else b""
            stderr += sep + "".join(f"[sandbox] {n}\n" for n in notes).encode()
        result = Result(
            status, wall, out.truncated or err.truncated, exit_code, len(stdout), cell_number
        )
        return result, stdout + stderr

    # -- after the reply --------------------------------------------------------------------------
    def finish(self, keep: bool, caller: socket.socket, warm: bool = True) -> None:
        """After the reply: the deferred rollback, a stateless call's fresh filesystems, and the
        next call's cell process, forked, announced and checked (and warmed up if `warm`); one
        the `caller`'s next order comes before is waited for by that call."""
        reap = self.hold.settle()
        if not keep:
            self.jail.fresh_files()
        self.hold.prepare(reap, warm, caller)

    def close(self) -> None:
        """Kill every process of the session and wait until they are gone (CLOSE_WAIT_S at
        most), then release the jail."""
        self.hold.kill_all()
        reap_all(CLOSE_WAIT_S)
        self.jail.close()


def session_main(handoff: socket.socket, settings: dict, uid: int | None, scoped: bool) -> None:
    """The body of P: wait to be handed a caller, then serve it until it hangs up."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    prctl(PR_SET_TIMERSLACK, 1)  # short waits (for a cell to stop) last as long as asked
    set_name(b"sandbox-super")
    if settings.get("session_namespaces"):
        isolate_session(own_pid_namespace=bool(settings["pid_namespace"]) and os.getpid() == 1)
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
            session.finish(order.keep, client, warm=not caller_waited)
            caller_waited = bool(select.select([client], [], [], 0)[0])
    except OSError:
        pass
    finally:  # the caller's close() returns once the session's processes are gone
        session.close()
        client.close()
