"""The supervisor P's hold on its session's processes: the state process S, in one of four
phases, and the cell process C that S forked for the next call.

`Phase` names what S is; `MOVES` lists every move between phases, and `StateHold._move` is the
one place that makes them. The moves are: `spawn` (a fresh S), `promote` (a successful cell
becomes S, stopped), `wake` and `stop` (SIGCONT and SIGSTOP of a kept S), and `kill_all` (no S,
no process of the session but P). `prepare` forks, announces and checks the next call's cell;
`rollback` has S end a discarded cell and checks that it did.
"""

from __future__ import annotations

import enum
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
from .linux import CELL_OOM_SCORE_ADJ, STATE_OOM_SCORE_ADJ, set_oom_score_adj
from .processes import kill_as, own_proc_pid, pid_of_pidfd, pidfd_signal
from .protocol import CellReady, Fork, ForkFailed, ProtocolError, Rollback, RolledBack, recv, send
from .state import state_process

READY_S = 10.0  # a state forks and its cell announces itself within this
ROLLBACK_S = 2.0  # a state rolls back within this
LATE_STATE = (
    "the session's state did not fork this call's process within its timeout (something the"
    " code left in it, such as a signal handler or a finalizer, may hold it up)"
)


def _order_comes_first(caller: socket.socket, announcement: socket.socket, deadline: float) -> bool:
    """Wait until the state's announcement or the caller's next order can be read (or until
    `deadline`); whether it is the order, with no announcement yet."""
    poller = select.poll()
    for sock in (caller, announcement):
        poller.register(sock, select.POLLIN)
    while (left := deadline - time.monotonic()) > 0:
        ready = {fd for fd, _ in poller.poll(max(1, int(left * 1000)))}
        if announcement.fileno() in ready:
            return False
        if caller.fileno() in ready:
            return True
    return False


class Phase(enum.Enum):
    """What the session's state process S is, as P holds it."""

    NONE = "none"
    """No state process: before the first, and after `kill_all` ended every process."""
    PRISTINE = "pristine"
    """A fresh state, forked from the server's warm interpreter: no code has run in it."""
    KEPT = "kept"
    """A promoted cell, awake: its threads are the code's; it runs while it forks or rolls back."""
    STOPPED = "stopped"
    """A promoted cell, stopped (SIGSTOP), so that the code's threads do not run between calls."""


MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.NONE: frozenset({Phase.PRISTINE, Phase.NONE}),  # spawn; kill_all
    Phase.PRISTINE: frozenset({Phase.STOPPED, Phase.NONE}),  # promote; kill_all
    Phase.KEPT: frozenset({Phase.STOPPED, Phase.NONE}),  # stop or promote; kill_all
    Phase.STOPPED: frozenset({Phase.KEPT, Phase.STOPPED, Phase.NONE}),  # wake; promote; kill_all
}
"""The phases each phase can move to. A promotion replaces S by another process (so STOPPED can
follow STOPPED); a stop that finds S gone leaves it KEPT until a later order fails."""


class StateHold:
    """P's handles on the state S (its channel, pidfd and /proc pid, its `phase`, the attributes
    read from a kept state) and on the cell it forked for the next call (`cell`); `lost` says why
    S was last reset, for the next call's notes, and `rollback_due` that a discarded cell's
    rollback was left for after the reply."""

    def __init__(self, settings: dict, uid: int | None, scoped: bool, is_init: bool, scratch: str):
        self.settings, self.uid, self.scoped, self.is_init = settings, uid, scoped, is_init
        self.scratch = scratch
        self.own_proc_pid = own_proc_pid()
        self.phase = Phase.NONE
        self.chan: socket.socket | None = None
        self.pidfd: int | None = None
        self.proc_pid: int | None = None  # pids as /proc names them
        self.attributes: StateAttributes | None = None  # a kept state's, once read
        self.cell: ReadyCell | None = None
        self.forking: socket.socket | None = None  # the channel of a cell not announced yet
        self.lost: str | None = None
        self.rollback_due = False

    # -- the phases -------------------------------------------------------------------------------
    def _move(self, to: Phase) -> None:
        assert to in MOVES[self.phase], f"the state cannot move from {self.phase} to {to}"
        self.phase = to

    def _hold(self, chan: socket.socket, pidfd: int, proc_pid: int | None, to: Phase) -> None:
        """Hold a new state process, closing the handles on the previous one."""
        if self.chan is not None:
            self.chan.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
        self.chan, self.pidfd, self.proc_pid = chan, pidfd, proc_pid
        self.attributes = None
        self._move(to)

    def spawn(self) -> None:
        """NONE -> PRISTINE: fork a fresh state."""
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
        self._hold(mine, pidfd, pid_of_pidfd(pidfd), Phase.PRISTINE)

    def promote(self, cell: ReadyCell) -> bool:
        """-> STOPPED: make the cell, which says it has promoted itself, the state, if its
        promotion holds (the old state is killed and the cell stopped to check it)."""
        if not promotion_holds(cell, self.pidfd, self.proc_pid, self.own_proc_pid):
            return False
        self._hold(cell.channel(), cell.pidfd, cell.proc_pid, Phase.STOPPED)  # stopped by the check
        cell.chan, cell.pidfd = None, -1
        # the next cell, forked from it, raises its own score again (cell.py): the OOM killer
        # then takes it before this state (the pid is ours to reap: it cannot be reused yet)
        set_oom_score_adj(cell.proc_pid, STATE_OOM_SCORE_ADJ)
        return True

    def wake(self) -> None:
        """STOPPED -> KEPT, so that the state can answer an order."""
        if self.phase is Phase.STOPPED:
            pidfd_signal(self.pidfd, signal.SIGCONT)
            self._move(Phase.KEPT)

    def stop(self) -> None:
        """KEPT -> STOPPED, so that the code's threads do not run until the state is needed."""
        if self.phase is Phase.KEPT and pidfd_signal(self.pidfd, signal.SIGSTOP):
            self._move(Phase.STOPPED)

    def kill_all(self) -> None:
        """-> NONE: SIGKILL every process of the session but this supervisor; no state survives."""
        if self.forking is not None:
            self.forking.close()
            self.forking = None
        if self.cell is not None:
            pidfd_signal(self.cell.pidfd, signal.SIGKILL)
            self.cell.close()
            self.cell = None
        pidfd_signal(self.pidfd, signal.SIGKILL)  # the pristine state may be of another uid
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        if self.pidfd is not None:
            os.close(self.pidfd)
        self.pidfd = self.proc_pid = None
        self.rollback_due = False
        self.attributes = None
        self._move(Phase.NONE)
        if self.is_init:  # pid 1 of the session's own namespace: kill(-1) reaches only it
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif self.scoped:  # a helper with the session's uid does it
            assert self.uid is not None  # scoped, yet not the init of a pid namespace: by uid
            kill_as(self.uid)

    # -- what the phases tell -----------------------------------------------------------------------
    @property
    def held(self) -> bool:
        """Whether there is a state process."""
        return self.phase is not Phase.NONE

    def channel(self) -> socket.socket:
        """The state's channel, where the caller knows there is a state."""
        assert self.chan is not None, "the session has no state process"
        return self.chan

    def trusted(self) -> bool:
        """Whether no code can have touched the state: the pristine state, of another uid than
        the code's."""
        return self.phase is Phase.PRISTINE and self.uid is not None

    # -- orders to the state ----------------------------------------------------------------------
    def prepare(
        self, reap: bool = False, warm: bool = True, caller: socket.socket | None = None
    ) -> None:
        """Have a cell process forked, announced and checked for the next call (a state first, if
        there is none), warmed up if `warm`; then stop the state. A state that cannot fork (at
        its process limit for longer than the patience of `processes.fork_when_possible`), or whose
        announcement does not hold, is replaced by a fresh one, once; `lost` says why, for the
        next call's notes. Where the `caller`'s next order comes before the announcement, the
        fork is left `forking` and that call waits for it, within its own timeout (`ready_cell`):
        a state held up by what the code left in it (a signal handler, a finalizer) then costs
        the call no more than its timeout."""
        for _ in range(2):
            if self.cell is not None or self.forking is not None:
                return
            if not self.held:
                self.spawn()
            self.wake()
            mine, theirs = socket.socketpair()
            try:
                send(self.channel(), Fork(reap, warm), fds=[theirs.fileno()])
            except OSError:
                mine.close()
                self._reset("the session's state process was gone; state was reset")
                continue
            finally:
                theirs.close()
                reap = False  # a fresh state has no cell to forget
            deadline = time.monotonic() + READY_S
            if caller is not None and _order_comes_first(caller, mine, deadline):
                self.forking = mine
                return
            self._take_cell(mine, deadline, "the session's state process was gone")

    def _take_cell(self, mine: socket.socket, deadline: float, silent: str) -> None:
        """Read and check the announcement of the cell the state was ordered to fork; on any
        failure, reset the session, `silent` saying why where the state did not answer."""
        try:
            ready, _, fds = recv(mine, CellReady, ForkFailed, deadline=deadline)
        except (ProtocolError, OSError):
            mine.close()
            self._reset(f"{silent}; state was reset")
            return
        if isinstance(ready, ForkFailed):
            mine.close()
            self._reset(f"{ready.error}; state was reset")
            return
        self.cell = announced_cell(mine, fds, self.proc_pid)
        if self.cell is None:
            self._reset("the session's state announced a cell that is not one; state was reset")
            return
        # the OOM killer takes the cell before its state (a cell of an undumpable state
        # cannot write its own /proc files; this supervisor can)
        set_oom_score_adj(self.cell.proc_pid, CELL_OOM_SCORE_ADJ)
        self.stop()

    def _reset(self, why: str) -> None:
        self.lost = why
        self.kill_all()

    def ready_cell(self, notes: list[str], keep: bool, deadline: float) -> ReadyCell | None:
        """The waiting cell process (normally forked and announced long before this call), taken
        for the call; None, with a note saying why, if there is none to be had. A cell still
        being forked is waited for until `deadline`, the call's: if the state has not announced
        it by then, the session is reset and nothing runs; if it failed before, a fresh state
        forks one."""
        if self.forking is not None:
            mine, self.forking = self.forking, None
            self._take_cell(mine, deadline, LATE_STATE)
        if self.cell is None and time.monotonic() < deadline:
            self.prepare()  # a fresh state, where the old one failed in time to leave some
        cell, self.cell = self.cell, None
        if self.lost is not None:
            notes.append(self.lost)
            if keep and cell is not None:
                notes.append("the previous state was lost; this cell ran in a fresh session")
            self.lost = None
        return cell

    def cell_was_alone(self, cell: ReadyCell) -> bool:
        """Kill the discarded cell and tell whether it was the only process of the code
        (`checks.cell_was_alone`)."""
        return cell_was_alone(cell, self.proc_pid, self.own_proc_pid)

    def rollback(self, cell_proc_pid: int | None) -> int | None:
        """Have the state kill the discarded cell and all it started, and check that it did (a
        state that has run code may not); on any failure, end every process of the session.
        Returns the cell's wait status as the state reports it, if plausible."""
        self.wake()
        try:
            send(self.channel(), Rollback())
            ack, _, _ = recv(self.channel(), RolledBack, deadline=time.monotonic() + ROLLBACK_S)
        except (ProtocolError, OSError):
            self.kill_all()
            return None
        if not rollback_holds(cell_proc_pid, self.proc_pid, self.own_proc_pid):
            self.kill_all()
            return None
        if self.attributes is not None and not self.attributes.restored():
            self.kill_all()
            self.lost = (
                "the discarded cell changed its state's scheduling or limits; state was reset"
            )
            return None
        ws = ack.wait_status
        return ws if type(ws) is int and 0 <= ws < 1 << 16 else None

    def settle(self) -> bool:
        """After the reply: read a newly kept state's attributes (before its first cell runs),
        and do a deferred rollback, or leave it to the next Fork where the state is trusted.
        Returns whether the next Fork is to reap the discarded cell."""
        if self.phase in (Phase.KEPT, Phase.STOPPED) and self.attributes is None:
            self.attributes = StateAttributes.read(self.pidfd, self.proc_pid)
            if self.attributes is None:
                self.kill_all()
                self.lost = "the session's state could not be read; state was reset"
        if not self.rollback_due:
            return False
        self.rollback_due = False  # the discarded cell was alone: only the state's bookkeeping
        if self.trusted():  # then the next Fork does it
            return True
        self.rollback(None)
        return False
