"""The sandbox's wire protocol: the one module that both the client and the server import.

Framing (framing.py): a message is a JSON header and a raw payload, with descriptors; every
read bounds the sizes and, given a deadline, the whole message's time.

Messages. Each kind of message is a small class below, named by the `op` of its header; the
receiver says which kinds it expects, and anything else is a `BadMessage`. One call, and what the
session prepares for the next one while it waits (server: `server.py`, supervisor P:
`supervisor.py`, state S: `state.py`, cell C: `cell.py`):

    client ── Open + [socket] ──► server ── Attach + [socket] ──► P      (opening a session)
    client ── Run + code ──► P ── RunCell + code ──► C
                                 P ◄── CellDone ── C        (C promotes itself if it has time)
                                 P ── Promote ──► C, P ◄── Promoted ── C   (C finished late)
    client ◄── Result + stdout + stderr ── P
    after the reply:     P ── Rollback ──► S, P ◄── RolledBack ── S   (a discarded cell; for
                         one found alone, by the pristine state, Fork's `reap` does it)
                         P ── Fork + [socket] ──► S; on that socket P ◄── CellReady +
                         [pidfd, stdout, stderr] ── C (the next call's cell), or ◄── ForkFailed ── S

The server announces itself to the client with ServerReady on its control socket.
"""

from __future__ import annotations

import os
import socket

from .framing import (
    MAX_HEADER,
    MAX_PAYLOAD,
    SMALL_HEADER,
    ProtocolError,
    decode_header,
    encode_header,
    recv_msg,
    recv_msg_within,
    send_msg,
)


# -- messages --------------------------------------------------------------------------------------
class BadMessage(ProtocolError):
    """A well-formed message that is not one the receiver expects: another op, or fields that do
    not fit its kind."""


class Message:
    """Base of the kinds of message. A kind's class holds its header's `op`, what one message may
    carry (`max_payload` bytes, a header of `max_header` bytes, `fds` descriptors) and its fields
    (`names`, its `__slots__`: the header's other keys); `header()` encodes a message,
    `from_header()` decodes one and says what does not fit. Messages are not changed once made.

    Each kind writes its methods out, small and plain, rather than having them generated (as a
    dataclass would): the state and cell processes are fresh forks, which pay a copy-on-write
    page fault for every page of objects they touch, and they run these methods on every call
    (docs/sandbox.md)."""

    __slots__ = ()
    op = ""
    max_payload = 0
    max_header = MAX_HEADER
    fds = 0
    names: tuple = ()

    def header(self) -> dict:
        return {"op": self.op}

    @staticmethod
    def from_header(header: dict) -> Message:
        """The message `header` holds; KeyError, TypeError or ValueError if it does not fit.
        (Kinds without fields need none: `decode` makes their messages.)"""
        raise NotImplementedError

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and all(
            getattr(self, name) == getattr(other, name) for name in self.names
        )

    __hash__ = None

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.names)
        return f"{type(self).__name__}({fields})"


class ServerReady(Message):
    """Server -> client, once the preloads are imported and the session pool is filled."""

    __slots__ = names = ("pid", "protections", "separate_uid", "shown")
    op = "ready"

    def __init__(self, pid: int, protections: dict, separate_uid: bool, shown: list | None = None):
        self.pid = pid
        self.protections = protections  # those the server established: private_tmp, hidden_home
        self.separate_uid = separate_uid  # whether sessions run as uids of their own
        self.shown = list(shown or [])  # the host paths a minimal root shows (none without one)

    def header(self) -> dict:
        return {
            "op": "ready",
            "pid": self.pid,
            "protections": self.protections,
            "separate_uid": self.separate_uid,
            "shown": self.shown,
        }

    @staticmethod
    def from_header(header: dict) -> ServerReady:
        shown = header.get("shown") or []
        if not isinstance(shown, list) or not all(isinstance(p, str) for p in shown):
            raise BadMessage("ready: shown must be a list of paths")
        return ServerReady(
            int(header["pid"]),
            dict(header["protections"]),
            bool(header.get("separate_uid")),
            shown,
        )


class Open(Message):
    """Client -> server: open a session; carries the client's end of the session's socket."""

    __slots__ = ()
    op, fds = "open", 1


class Attach(Message):
    """Server -> a pooled supervisor P: serve this client (its socket travels along)."""

    __slots__ = ()
    op, fds = "attach", 1


class Run(Message):
    """Client -> P: run the payload (UTF-8 code) as the session's next cell."""

    __slots__ = names = ("timeout_s", "keep")
    op, max_payload = "run", MAX_PAYLOAD

    def __init__(self, timeout_s: float, keep: bool):
        self.timeout_s = timeout_s
        self.keep = keep  # whether a successful cell becomes the session's state

    def header(self) -> dict:
        return {"op": "run", "timeout_s": self.timeout_s, "keep": self.keep}

    @staticmethod
    def from_header(header: dict) -> Run:
        return Run(float(header["timeout_s"]), bool(header.get("keep", True)))


class Result(Message):
    """P -> client: a call's outcome; the payload is stdout then stderr, split at `stdout_len`."""

    __slots__ = names = ("status", "wall_s", "truncated", "exit_code", "stdout_len", "cell")
    op, max_payload = "result", MAX_PAYLOAD

    def __init__(
        self,
        status: str,
        wall_s: float,
        truncated: bool,
        exit_code: int | None,
        stdout_len: int,
        cell: int,
    ):
        self.status = status
        self.wall_s = wall_s
        self.truncated = truncated
        self.exit_code = exit_code
        self.stdout_len = stdout_len
        self.cell = cell

    def header(self) -> dict:
        return {
            "op": "result",
            "status": self.status,
            "wall_s": self.wall_s,
            "truncated": self.truncated,
            "exit_code": self.exit_code,
            "stdout_len": self.stdout_len,
            "cell": self.cell,
        }

    @staticmethod
    def from_header(header: dict) -> Result:
        return Result(
            header["status"],
            float(header["wall_s"]),
            bool(header["truncated"]),
            header.get("exit_code"),
            int(header["stdout_len"]),
            int(header["cell"]),
        )


class Fork(Message):
    """P -> state S: fork the next call's cell process C, which talks to P on the socket that
    travels along. With `reap`, S first forgets the previous cell, which P has killed and found
    alone: a rollback with nothing to kill, without a round trip of its own. With `warm`, C
    takes its copy-on-write faults in a warm-up run before it announces itself (worth it when the
    caller leaves time between calls; a caller that is already waiting would wait for it)."""

    __slots__ = names = ("reap", "warm")
    op, fds = "fork", 1

    def __init__(self, reap: bool = False, warm: bool = True):
        self.reap, self.warm = reap, warm

    def header(self) -> dict:
        return {"op": "fork", "reap": self.reap, "warm": self.warm}

    @staticmethod
    def from_header(header: dict) -> Fork:
        return Fork(header.get("reap") is True, header.get("warm") is not False)


class ForkFailed(Message):
    """S -> P, on the socket meant for the cell: the fork failed."""

    __slots__ = names = ("error",)
    op = "fork_failed"
    max_header = SMALL_HEADER

    def __init__(self, error: str):
        self.error = error

    def header(self) -> dict:
        return {"op": "fork_failed", "error": self.error}

    @staticmethod
    def from_header(header: dict) -> ForkFailed:
        return ForkFailed(str(header.get("error")))


class CellReady(Message):
    """C -> P: ready for its cell; carries C's pidfd and the read ends of its stdout and stderr."""

    __slots__ = names = ("proc_pid",)
    op, fds = "ready", 3
    max_header = SMALL_HEADER

    def __init__(self, proc_pid: int | None):
        self.proc_pid = proc_pid  # C's pid as P's /proc names it (sent before any code ran)

    def header(self) -> dict:
        return {"op": "ready", "proc_pid": self.proc_pid}

    @staticmethod
    def from_header(header: dict) -> CellReady:
        proc_pid = header.get("proc_pid")
        return CellReady(proc_pid if type(proc_pid) is int else None)


class RunCell(Message):
    """P -> C: run the payload (UTF-8 code)."""

    __slots__ = names = ("cell", "cpu_s", "keep", "promote_by")
    op, max_payload = "run", MAX_PAYLOAD

    def __init__(self, cell: int, cpu_s: int, keep: bool, promote_by: float):
        self.cell = cell  # the cell's number, as tracebacks name it
        self.cpu_s = cpu_s  # C's CPU-time limit
        self.keep = keep
        self.promote_by = promote_by  # time.monotonic() until which C may promote itself

    def header(self) -> dict:
        return {
            "op": "run",
            "cell": self.cell,
            "cpu_s": self.cpu_s,
            "keep": self.keep,
            "promote_by": self.promote_by,
        }

    @staticmethod
    def from_header(header: dict) -> RunCell:
        return RunCell(
            int(header["cell"]),
            int(header["cpu_s"]),
            bool(header.get("keep")),
            float(header["promote_by"]),
        )


CELL_STATUSES = ("ok", "error", "memory")


class CellDone(Message):
    """C -> P: the cell's status, and whether C has made itself the session's state. C has run
    the code by then, so this is read leniently: an unknown status reads as "crashed"."""

    __slots__ = names = ("status", "promoted")
    op = "done"
    max_header = SMALL_HEADER

    def __init__(self, status: str, promoted: bool = False):
        self.status = status
        self.promoted = promoted

    def header(self) -> dict:
        return {"op": "done", "status": self.status, "promoted": self.promoted}

    @staticmethod
    def from_header(header: dict) -> CellDone:
        status = header.get("status")
        return CellDone(
            status if status in CELL_STATUSES else "crashed", header.get("promoted") is True
        )


class Promote(Message):
    """P -> C, for a cell that finished too close to its deadline to promote itself."""

    __slots__ = ()
    op = "promote"


class Promoted(Message):
    """C -> P: C is now the session's state."""

    __slots__ = ()
    op = "promoted"
    max_header = SMALL_HEADER


class Rollback(Message):
    """P -> S: kill the discarded cell and everything it started."""

    __slots__ = ()
    op = "rollback"


class RolledBack(Message):
    """S -> P: done; `wait_status` is the cell's, if it had ended by itself."""

    __slots__ = names = ("wait_status",)
    op = "rolled_back"
    max_header = SMALL_HEADER

    def __init__(self, wait_status: int | None):
        self.wait_status = wait_status  # as sent: not checked here

    def header(self) -> dict:
        return {"op": "rolled_back", "wait_status": self.wait_status}

    @staticmethod
    def from_header(header: dict) -> RolledBack:
        return RolledBack(header.get("wait_status"))


def decode(header: dict, kinds) -> Message:
    """The message of one of `kinds` that `header` holds; BadMessage if it holds none."""
    op = header.get("op")
    for kind in kinds:
        if kind.op == op:
            try:
                return kind.from_header(header) if kind.names else kind()
            except (KeyError, TypeError, ValueError) as exc:
                raise BadMessage(f"malformed {op!r} message: {exc!r}") from None
    raise BadMessage(f"expected {' or '.join(repr(k.op) for k in kinds)}, got {op!r}")


def rehearse(*messages: Message) -> None:
    """Encode and decode `messages` as `send` and `recv` do, without a socket. A forked process
    that does this while it waits for its call takes then, not during the call, the
    copy-on-write faults of the objects that path touches."""
    for message in messages:
        decode(decode_header(encode_header(message.header())), (type(message),))


def send(sock: socket.socket, message: Message, payload: bytes = b"", fds=()) -> None:
    send_msg(sock, message.header(), payload, fds)


def recv(
    sock: socket.socket, *kinds, timeout_s: float | None = None, deadline: float | None = None
):
    """Returns (message, payload, fds) for a message of one of `kinds`, whose sizes bound the
    read. ProtocolError on EOF, a malformed frame or a passed deadline; BadMessage (its
    descriptors closed) for a message of another kind. With `timeout_s`, every read is bounded
    (see `recv_msg_within`); with `deadline` (time.monotonic()), the whole message is."""
    max_payload = max_fds = max_header = 0
    for kind in kinds:
        max_payload = max(max_payload, kind.max_payload)
        max_fds = max(max_fds, kind.fds)
        max_header = max(max_header, kind.max_header)
    bounds = {"max_payload": max_payload, "max_fds": max_fds, "max_header": max_header}
    if deadline is not None:
        header, payload, fds = recv_msg(sock, deadline=deadline, **bounds)
    elif timeout_s is None:
        header, payload, fds = recv_msg(sock, **bounds)
    else:
        header, payload, fds = recv_msg_within(sock, timeout_s, **bounds)
    try:
        return decode(header, kinds), payload, fds
    except BadMessage:
        for fd in fds:
            os.close(fd)
        raise
