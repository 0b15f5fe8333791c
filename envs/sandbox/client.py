"""The client side: PythonSandbox and its sessions, in the caller's process.

A PythonSandbox starts the server (server.py) as a fresh interpreter (launch.py) and talks to it,
and to each session's supervisor, over sockets in the messages of protocol.py. Its configuration
and its error are in config.py. The threat model is in the package's docstring (__init__.py).
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import socket
import subprocess
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Literal, Self

from .config import SandboxConfig, SandboxError
from .framing import MAX_PAYLOAD
from .launch import start_server, stop_server
from .protocol import Open, ProtocolError, Result, Run, recv, send

Status = Literal["ok", "error", "timeout", "memory", "crashed"]


@dataclass(frozen=True)
class ExecutionResult:
    """What one call produced."""

    stdout: str
    stderr: str
    """Error output; on failure, a traceback whose line numbers refer to the snippet."""
    status: Status
    """"ok", "error" (an exception), "timeout", "memory" or "crashed" (killed or exited
    abnormally)."""
    truncated: bool
    """Whether stdout or stderr exceeded the output cap and lost its middle."""
    wall_s: float
    """Wall-clock time of the code, measured by the supervisor."""
    exit_code: int | None = None
    """For "crashed": the exit code, or minus the signal number that killed the process."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


CLOSE_WAIT_S = 5.0
"""How long SandboxSession.close waits for the session's processes to end."""

_warned = False
_warn_lock = threading.Lock()


class PythonSandbox:
    """A pool of contained Python sessions served by one pre-warmed interpreter.

    Thread-safe: any number of threads may call `run` or hold sessions at once. Start-up (mostly
    importing sympy) happens on first use or on `start()`. `close()`, the context
    manager, or garbage collection stop the server and every process it started.
    """

    def __init__(self, config: SandboxConfig | None = None, **overrides):
        config = config or SandboxConfig()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._protections: dict[str, bool] = {}
        self._shown: list[str] = []
        self._finalizer = None
        self._idle: list[socket.socket] = []  # sessions that serve stateless calls, ready
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> Self:
        """Start the server, or a new one when it has died (the sessions it served are lost:
        their calls raise SandboxError; new sessions come from the new server). A sandbox
        that was closed stays closed: RuntimeError."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this PythonSandbox is closed: make a new one")
            if self._proc is not None and self._proc.poll() is not None:
                self._discard_dead_server_locked()
            if self._proc is None:
                self._start_locked()
        return self

    def _discard_dead_server_locked(self) -> None:
        """Forget a server that has exited: its ready stateless sessions and its control
        channel went with it."""
        for sock in self._idle:
            sock.close()
        self._idle.clear()
        if self._finalizer is not None:
            self._finalizer()
        self._proc = self._control = self._finalizer = None

    @property
    def pid(self) -> int | None:
        """The pid of the process this sandbox started: the server, or the `unshare` that runs
        it (whose death ends the server and every session). None before the start."""
        return None if self._proc is None else self._proc.pid

    def _start_locked(self) -> None:
        proc, control, self._protections, self._shown = start_server(self.config)
        self._proc, self._control = proc, control
        self._finalizer = weakref.finalize(self, stop_server, proc, control)
        self._warn_once()

    def _warn_once(self) -> None:
        global _warned
        off = [name for name, on in self._protections.items() if not on]
        with _warn_lock:
            if off and not _warned:
                _warned = True
                why = (
                    "because isolation='none' was asked for"
                    if self.config.isolation == "none"
                    else "on this machine; run as root (or allow user namespaces) with "
                    "util-linux `unshare` installed for all protections"
                )
                warnings.warn(
                    f"PythonSandbox runs with reduced containment {why}. Off: {', '.join(off)}.",
                    stacklevel=3,
                )

    @property
    def protections(self) -> dict[str, bool]:
        """Which protections hold on this machine (starts the server if needed)."""
        self.start()
        return dict(self._protections)

    @property
    def visible_paths(self) -> tuple[str, ...]:
        """The host directories (and module files) the code sees, read-only, in its minimal
        root, besides the root's own /dev, /etc (copies), /proc, /tmp and /var/tmp (starts the
        server if needed). Empty where `protections["minimal_root"]` does not hold: the code
        then sees what an unprivileged user of the host sees, less the hidden directories."""
        self.start()
        return tuple(self._shown)

    def close(self) -> None:
        """Stop the server; every session and process of this sandbox ends with it (the
        server is waited for, 5 s at most before it is killed). Later calls raise RuntimeError."""
        with self._lock:
            self._closed = True
            for sock in self._idle:
                sock.close()
            self._idle.clear()
            if self._finalizer is not None:
                self._finalizer()
            self._proc = self._control = self._finalizer = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls ------------------------------------------------------------------------------------
    def session(self) -> SandboxSession:
        """A session whose variables, imports and functions persist from call to call."""
        return SandboxSession(self._open())

    def run(self, code: str, timeout_s: float | None = None) -> ExecutionResult:
        """Run `code` with no state: a fork of a pristine session state that never becomes the
        state, in a scratch directory emptied afterwards."""
        timeout_s = self._timeout(timeout_s)
        payload = _encoded(code)
        with self._lock:
            sock = self._idle.pop() if self._idle else None
        conn = (sock, self) if sock is not None else self._open()
        result = _call(conn, payload, timeout_s, keep=False)
        with self._lock:
            if self._finalizer is not None and len(self._idle) < 2 * (os.cpu_count() or 1) + 2:
                self._idle.append(conn[0])
                conn = None
        if conn is not None:
            conn[0].close()
        return result

    def _timeout(self, timeout_s: float | None) -> float:
        if timeout_s is not None and (
            isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float)
        ):
            raise TypeError(
                f"timeout_s must be a number of seconds, got {type(timeout_s).__name__}"
            )
        t = self.config.timeout_s if timeout_s is None else float(timeout_s)
        if not (math.isfinite(t) and 0 < t <= self.config.max_timeout_s):
            raise ValueError(f"timeout_s must be in (0, {self.config.max_timeout_s}], got {t}")
        return t

    def _open(self) -> tuple[socket.socket, PythonSandbox]:
        for attempt in range(2):
            self.start()
            mine, theirs = socket.socketpair()
            try:
                with self._lock:
                    if self._control is None:  # closed by another thread since start()
                        raise ConnectionError("the sandbox server is closed")
                    send(self._control, Open(), fds=[theirs.fileno()])
                return mine, self
            except OSError:
                mine.close()
                if attempt:
                    raise SandboxError("the sandbox server is not answering") from None
                with self._lock:  # the server died: start a new one once
                    if self._finalizer is not None:
                        self._finalizer()
                    self._proc = None
            finally:
                theirs.close()
        raise AssertionError("unreachable")


def _encoded(code: str) -> bytes:
    """The code as the server receives it, checked here: a str, within a message's payload
    (larger code is the caller's error, not the session's)."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    payload = code.encode("utf-8", "surrogatepass")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(
            f"the code is {len(payload)} bytes in UTF-8; a call takes at most {MAX_PAYLOAD}"
        )
    return payload


def _call(conn, payload: bytes, timeout_s: float, keep: bool) -> ExecutionResult:
    """One call over a session's socket; the socket is closed if the session stops answering."""
    sock, _ = conn
    try:
        send(sock, Run(timeout_s, keep), payload)
        result, payload, _ = recv(sock, Result, timeout_s=timeout_s + 30.0)
    except (ProtocolError, OSError) as exc:
        sock.close()
        raise SandboxError(f"the sandbox session stopped answering ({exc})") from exc
    n = result.stdout_len
    return ExecutionResult(
        stdout=payload[:n].decode("utf-8", "replace"),
        stderr=payload[n:].decode("utf-8", "replace"),
        status=result.status,
        truncated=result.truncated,
        wall_s=result.wall_s,
        exit_code=result.exit_code,
    )


class SandboxSession:
    """One episode's Python process state; use as a context manager or call `close()`."""

    def __init__(self, conn):
        self._conn = conn
        self._lock = threading.Lock()
        self.closed = False

    def run(self, code: str, timeout_s: float | None = None) -> ExecutionResult:
        """Run `code` as the next cell. On success its variables, imports and processes' effects
        on the state persist; on failure (an error, a timeout, a crash) the state is the one
        before the cell. Files are not rolled back: what a failed cell wrote in the session's
        scratch directory (or /dev/shm) stays until the session ends, as a notebook's would."""
        with self._lock:
            if self.closed:
                raise RuntimeError("this sandbox session is closed")
            payload = _encoded(code)
            return _call(self._conn, payload, self._conn[1]._timeout(timeout_s), keep=True)

    def close(self) -> None:
        """End the session: its supervisor kills its processes and hangs up once they are gone,
        which this waits for (CLOSE_WAIT_S at most)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            sock = self._conn[0]
            try:
                sock.shutdown(socket.SHUT_WR)  # the supervisor reads the end of its orders
                sock.settimeout(CLOSE_WAIT_S)
                while sock.recv(4096):
                    pass
            except OSError:  # gone already, or slower than CLOSE_WAIT_S
                pass
            finally:
                sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: nothing to report to
            pass


_shared: PythonSandbox | None = None
_shared_lock = threading.Lock()


def shared_sandbox() -> PythonSandbox:
    """One PythonSandbox per process with the default config, started on first use and stopped
    at exit: what environments use unless they are given a sandbox of their own."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = PythonSandbox()
            atexit.register(_shared.close)
        return _shared
