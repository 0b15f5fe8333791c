"""The sandbox server: a pre-warmed interpreter that forks contained Python sessions.

`envs.sandbox.PythonSandbox` starts this file as a fresh interpreter (never a fork of the caller,
so none of the caller's memory or secrets is copied), inside new mount, network and pid
namespaces where the machine allows. It imports the scientific stack once, then serves sessions:

    server ──unshare(pid) + fork──► P  (pid 1 of the session's own pid namespace; root)
                                     └─fork─► S  (state: the session's globals; uid X)
                                               └─fork─► C  (runs one cell; uid X)

The server keeps a few sessions ready (P and S forked and warmed up) and hands one to each caller
that opens a session. P supervises its session and talks to the caller over a socket of its own.
The next cell's process C is made before the cell exists: once the caller has a result, P orders S
to fork C, handing S the channel C will use; C takes its copy-on-write faults in a warm-up run,
makes its output pipes and hands P its pidfd and their read ends over that channel; a call then
only sends C the code. S does as little as it can while C lives (each page it writes then is a
copied page), and forks without CPython's after-fork hooks when it has no other thread
(`lean_fork`). The processes name themselves (sandbox-server, -super, -state, -cell) for ps. C
runs it with stdout/stderr on the pipes that P drains and reports its status. If the cell succeeds
(and the session keeps state), C becomes the new state and kills every other process of the
session (the old state, and whatever the code started); otherwise S kills C and everything C
started and stays the state. Stateless calls use the same path but never promote. "Kill every
other process" is `kill(-1, SIGKILL)`, which is scoped: it only reaches the session's own pid
namespace (or, without namespaces, the session's own uid), and it is never used where neither
scope holds. A discarded cell is killed by P at once; when the kernel's lists of children show
that it was the only process of the code, S's scoped kill waits until the caller has its answer
(`Session.cell_was_alone`).

Only the standard library is imported at module level: envs.sandbox imports the framing helpers
from here, and the preloads happen in `main()`.
"""

from __future__ import annotations

import _thread
import ast
import builtins
import ctypes
import ctypes.util
import dataclasses
import gc
import io
import json
import linecache
import os
import random
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import time
import traceback

# ---------------------------------------------------------------------------------------------
# Framing: a message is (len(header), len(payload)) as two uint32, a JSON header, raw payload.
# File descriptors travel with the length prefix (SCM_RIGHTS). Readers bound every size, since
# the state and cell processes on the other end run untrusted code.
# ---------------------------------------------------------------------------------------------
_PREFIX = struct.Struct("!II")
MAX_HEADER = 1 << 16


class ProtocolError(Exception):
    """A peer sent something that is not a well-formed message, or hung up."""


_encode_header = json.JSONEncoder(separators=(",", ":")).encode
_decode_header = json.JSONDecoder().decode


def send_msg(sock: socket.socket, header: dict, payload: bytes = b"", fds=()) -> None:
    head = _encode_header(header).encode()
    prefix = _PREFIX.pack(len(head), len(payload))
    if fds:
        socket.send_fds(sock, [prefix], list(fds))
        sock.sendall(head + payload)
    else:
        sock.sendall(prefix + head + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ProtocolError("peer closed the connection mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_msg(sock: socket.socket, max_payload: int = 1 << 26, max_fds: int = 4):
    """Returns (header, payload, fds). Raises ProtocolError on EOF or a malformed message."""
    prefix, fds = b"", []
    try:
        while len(prefix) < _PREFIX.size:
            if max_fds:
                data, new_fds, _, _ = socket.recv_fds(sock, _PREFIX.size - len(prefix), max_fds)
                fds.extend(new_fds)
            else:
                data = sock.recv(_PREFIX.size - len(prefix))
            if not data:
                raise ProtocolError("peer closed the connection")
            prefix += data
        head_len, payload_len = _PREFIX.unpack(prefix)
        if head_len > MAX_HEADER or payload_len > max_payload:
            raise ProtocolError(f"message too large ({head_len}, {payload_len})")
        body = _recv_exact(sock, head_len + payload_len)
        header = _decode_header(body[:head_len].decode())
        if not isinstance(header, dict):
            raise ProtocolError("message header is not an object")
        return header, body[head_len:], fds
    except (ProtocolError, OSError, ValueError) as exc:  # UnicodeError is a ValueError
        for fd in fds:
            os.close(fd)
        raise ProtocolError(str(exc)) from exc


def recv_msg_within(sock: socket.socket, timeout_s: float, **kwargs):
    """recv_msg with every read bounded by `timeout_s`. The socket keeps that timeout (setting it
    costs two fcntl calls), so use this function for every read of a socket, or none."""
    if sock.gettimeout() != timeout_s:
        sock.settimeout(timeout_s)
    return recv_msg(sock, **kwargs)


# ---------------------------------------------------------------------------------------------
# Linux primitives not in Python 3.11's os module.
# ---------------------------------------------------------------------------------------------
# PyDLL: calls keep the GIL, as os.fork() does (`lean_fork`); every caller is single-threaded.
_libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
PR_SET_DUMPABLE, PR_SET_NAME, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 4, 15, 36, 38


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def set_name(name: bytes) -> None:
    """The process's name as `ps` and `top` show it (at most 15 bytes)."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Server start-up: a private filesystem view, preloaded modules.
# ---------------------------------------------------------------------------------------------
CLOSED_TMP_DIRS = ("/tmp", "/var/tmp")  # root-owned 755: code writes in its scratch dir only
SHARED_TMP_DIRS = ("/dev/shm", "/run/lock")  # sticky 1777 (POSIX semaphores live in /dev/shm),
# emptied of a session's files whenever the session is reset or closed


def _hidden_ancestor(path: str) -> str | None:
    """The highest ancestor of `path` that other users cannot traverse (like /root, mode 700)."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/" + "/".join(parts[:i])
        try:
            if not os.stat(prefix).st_mode & 0o001:
                return prefix
        except OSError:
            return None
    return None


def private_filesystem(scratch_mb: int) -> None:
    """In the server's own mount namespace: fresh tmpfs over the temporary directories, and
    directories closed to other users (such as /root, with its tokens and caches) replaced by an
    empty tmpfs. What the interpreter needs (its prefix, its packages, the project on sys.path)
    is shown again at its own path inside whatever was covered, even if it lives under /tmp."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    tmp_dirs = [d for d in CLOSED_TMP_DIRS + SHARED_TMP_DIRS if os.path.isdir(d)]
    needed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.executable, *sys.path)
              if p and os.path.exists(p)}
    covers: dict[str, list[str]] = {d: [] for d in tmp_dirs}
    for p in sorted(needed):
        candidates = [d for d in tmp_dirs if p.startswith(d + "/")]
        hidden = _hidden_ancestor(p)
        if hidden is not None:
            candidates.append(hidden)
        if candidates:
            covers.setdefault(min(candidates, key=len), []).append(p)
    for top in sorted(covers, key=len):
        paths = covers[top]
        keep = [p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths)]
        held = [(p, os.open(p, os.O_PATH)) for p in keep]  # reachable after `top` is covered
        if top in tmp_dirs:
            mode = "755" if top in CLOSED_TMP_DIRS else "1777"
            mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, f"size={scratch_mb}m,mode={mode}")
        else:
            mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        for p, fd in held:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(p, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
                open(p, "w").close()
            mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
            os.close(fd)


def preload(modules: list[str]) -> None:
    for name in modules:
        __import__(name)
    if "sympy" in sys.modules:  # build sympy's lazy caches once, before any fork
        sp = sys.modules["sympy"]
        x = sp.Symbol("x")
        sp.factorint(2**32 + 1), sp.solve(x**2 - 2, x), sp.simplify(sp.sin(x) ** 2 + sp.cos(x) ** 2)
        sp.isprime(97), sp.Rational(1, 3) + 1, sp.integrate(x**2, x), sp.N(sp.pi, 30)
    gc.collect()
    gc.freeze()  # forked children then share these objects' pages instead of copying them
    collapse_into_huge_pages()


MADV_COLLAPSE, HUGE_PAGE = 25, 2 << 20


def collapse_into_huge_pages() -> None:
    """Back the warm heap with transparent huge pages (MADV_COLLAPSE, Linux >= 6.1): a fork then
    copies one page-table entry per 2 MiB where it copied 512, and an exit tears down as few
    (a page a child writes is split off and copied alone). On a 2-core VM this raised sessions'
    throughput by about a third. Only memory in use now is collapsed; later allocations follow
    the machine's THP policy. Best effort: where the kernel refuses, pages stay as they are."""
    madvise = _libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        return
    for line in maps:
        fields = line.split()
        if not fields[1].startswith("rw") or (len(fields) > 5 and fields[5] != "[heap]"):
            continue  # anonymous, writable memory only
        start, end = (int(x, 16) for x in fields[0].split("-"))
        for chunk in range(-(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE,
                           HUGE_PAGE):
            madvise(chunk, HUGE_PAGE, MADV_COLLAPSE)


# ---------------------------------------------------------------------------------------------
# Cleanup: kill every other process of the session.
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# The cell process C: run one snippet in the session's namespace.
# ---------------------------------------------------------------------------------------------
def run_cell(code: str, ns: dict, cell: int) -> str:
    """Execute `code` like a notebook cell; the value of a final expression is printed. Returns
    "ok", "error" or "memory". Tracebacks go to stderr and only show frames of the cells, with
    line numbers that refer to the snippet."""
    filename = f"<cell {cell}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
        tree = ast.parse(code, filename, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, filename, "exec"), ns)
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
        except BaseException:  # noqa: BLE001 - a broken stderr must not hide the status
            pass
        return "memory" if isinstance(exc, MemoryError) else "error"


def _stream(fd: int, line_buffering: bool) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8",
                            errors="backslashreplace", line_buffering=line_buffering)


def cell_process(chan: socket.socket, ns: dict, scoped: bool) -> socket.socket:
    """The forked child C, made ready before its cell exists: it takes its copy-on-write faults in
    a warm-up run, makes its output pipes, and hands the supervisor its pidfd and their read ends,
    all while the session waits for its caller. Then it runs the cell it is sent. Returns its
    channel if the cell succeeded and C was promoted to be the state; otherwise never returns.
    A cell that succeeds with time to spare before the call's deadline promotes itself and says
    so with its status; one that finishes later leaves the choice to the supervisor, which is
    the one to kill it at the deadline."""
    set_name(b"sandbox-cell")
    state_pid = os.getppid()
    run_cell(SPARE_WARM_UP, {"__builtins__": builtins}, 0)
    sys.stdout.flush()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(out_w)
    os.close(err_w)
    sys.stdout, sys.stderr = _stream(1, False), _stream(2, True)
    os.setpgid(0, 0)  # killpg(getpgrp()) by the code reaches only C and its children
    prctl(PR_SET_DUMPABLE, 1)  # /proc/self readable by the code (the state stays undumpable)
    pidfd = os.pidfd_open(os.getpid())
    proc_pid = int(os.readlink("/proc/self"))  # as the supervisor's /proc names it
    send_msg(chan, {"op": "ready", "proc_pid": proc_pid}, fds=[pidfd, out_r, err_r])
    for fd in (pidfd, out_r, err_r):
        os.close(fd)
    try:
        order, payload, _ = recv_msg(chan, max_fds=0)
    except ProtocolError:
        os._exit(0)
    if order.get("op") != "run":
        os._exit(0)
    cpu = int(order["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, resource.getrlimit(resource.RLIMIT_CPU)[1]))
    status = run_cell(payload.decode("utf-8", "replace"), ns, int(order["cell"]))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    if status == "ok" and order.get("keep") and time.monotonic() < order["promote_by"]:
        return _become_state(chan, {"status": "ok", "promoted": True}, scoped, state_pid)
    send_msg(chan, {"status": status})
    try:
        order, _, _ = recv_msg(chan, max_payload=0, max_fds=0)
    except ProtocolError:
        os._exit(0)
    if order.get("op") != "promote":
        os._exit(0)
    return _become_state(chan, {"op": "promoted"}, scoped, state_pid)


def _become_state(chan: socket.socket, answer: dict, scoped: bool, state_pid: int):
    """Promotion: end every other process of the session, detach from the cell's pipes, answer."""
    if scoped:
        kill_all_but_self(wait=False)  # the previous state, and everything the code started
    elif os.getppid() == state_pid:  # no scope for kill(-1): end the previous state only
        os.kill(state_pid, signal.SIGKILL)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    resource.setrlimit(resource.RLIMIT_CPU, resource.getrlimit(resource.RLIMIT_CPU)[1:] * 2)
    send_msg(chan, answer)
    sys.stdout, sys.stderr = _stream(1, False), _stream(2, True)  # whatever the cell left there
    set_name(b"sandbox-state")
    return chan


# ---------------------------------------------------------------------------------------------
# The state process S.
# ---------------------------------------------------------------------------------------------
WARM_UP = "import math, numpy, sympy\nprint(1 + 1, math.gcd(12, 18), numpy.arange(3).sum(), sympy.Integer(6))"
SPARE_WARM_UP = "squares = [i * i for i in range(8)]\nprint(sum(squares), 'ok')\nsquares"


def state_process(ctl: socket.socket, limits: dict, uid: int | None, scratch: str, scoped: bool):
    """Drops privileges, then serves the supervisor's orders: "fork" a cell process (announced with
    a channel of its own) that waits for the next cell, and "rollback" (kill the cell and all it
    started). A promoted cell continues this loop as the new state. The supervisor orders the
    fork once its caller has the previous result, so that the fork does not compete with it."""
    os.setsid()
    set_name(b"sandbox-state")
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.closerange(3, ctl.fileno())
    os.closerange(ctl.fileno() + 1, 1 << 16)
    mb = 1 << 20
    for res, value in ((resource.RLIMIT_AS, limits["memory_mb"] * mb),
                       (resource.RLIMIT_FSIZE, limits["max_file_mb"] * mb),
                       (resource.RLIMIT_NPROC, limits["max_processes"]),
                       (resource.RLIMIT_NOFILE, limits["max_open_files"]),
                       (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_CPU, int(limits["max_timeout_s"]) + 2)):
        resource.setrlimit(res, (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file past the cap raises OSError(EFBIG)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)  # also clears "dumpable": cells of this uid cannot ptrace the state
    prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries cannot raise privileges
    os.chdir(scratch)
    os.environ.update(HOME=scratch, TMPDIR=scratch)
    sys.stdout = sys.stderr = _stream(1, False)  # /dev/null until a cell rebinds them
    run_cell(WARM_UP, {"__builtins__": builtins}, 0)  # lazy imports and caches, once per session
    sys.stdout.flush()
    ns = {"__name__": "__main__", "__builtins__": builtins}
    cell_pid = 0
    while True:
        try:
            order, _, fds = recv_msg(ctl, max_payload=0, max_fds=1)
        except ProtocolError:
            os._exit(0)  # the supervisor is gone, or a promoted cell killed this old state
        if order.get("op") == "fork" and not cell_pid and len(fds) == 1:
            cell_pid = _fork_when_possible()
            if cell_pid == 0:
                ctl.close()
                ctl = cell_process(socket.socket(fileno=fds[0]), ns, scoped)
                continue  # this process is now the state
            if cell_pid is None:  # the answer to the order goes where the cell's would have
                cell_pid = 0
                with socket.socket(fileno=fds[0]) as chan:
                    send_msg(chan, {"op": "fork_failed", "error": "the session's state could not "
                                    "fork the call's process: its process limit is reached"})
            else:
                os.close(fds[0])
        elif order.get("op") == "rollback" and cell_pid:
            status = reap_children(watch_pid=cell_pid)  # set if the cell had already ended
            if scoped:
                kill_all_but_self(wait=False)
            elif _alive(cell_pid):
                os.killpg(cell_pid, signal.SIGKILL)
            cell_pid = 0
            send_msg(ctl, {"op": "rolled_back", "wait_status": status})
        else:
            os._exit(1)


def lean_fork() -> int:
    """fork() for a state process with no other Python thread: the child skips CPython's
    after-fork hooks (threading's bookkeeping and the like), whose writes to memory shared with
    the parent are copied page by page (without them, ~70 fewer page faults per call of ~600,
    measured with perf stat over 16 sessions). Those hooks only matter when other threads
    existed; with any, this is `os.fork()`. `random` is reseeded as its own hook would. The GIL
    stays held across the call, as `os.fork()` holds it."""
    if _thread._count():
        return os.fork()
    pid = _libc.fork()
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if pid == 0:
        random.seed()
    return pid


def _fork_when_possible(patience_s: float = 2.0) -> int | None:
    """fork(), retried while the session is at its process limit: processes killed at the end of
    the previous call hold their slots until their parent reaps them, a few milliseconds."""
    deadline = time.monotonic() + patience_s
    while True:
        reap_children()
        try:
            return lean_fork()
        except BlockingIOError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.002)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _proc_pid(pidfd: int) -> int | None:
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


def _read_proc(path: str) -> bytes:
    """A /proc file's whole text (raw os calls: this sits on a call's critical path)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _children(pid: int, expected: set[int] = frozenset()) -> set[int] | None:
    """The children of every thread of `pid` that are not zombies, as the kernel lists them
    (members of `expected` are returned without that check); None if `pid` or one of its threads
    vanished while they were read (a caller assumes the worst)."""
    found: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            found.update(map(int, _read_proc(f"/proc/{pid}/task/{tid}/children").split()))
    except (OSError, ValueError):
        return None
    return {child for child in found if child in expected or not _dead(child)}


def _dead(pid: int) -> bool:
    """A zombie (it ran to its end and creates nothing more), or already reaped."""
    try:
        return _read_proc(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


# ---------------------------------------------------------------------------------------------
# The session supervisor P.
# ---------------------------------------------------------------------------------------------
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


def _describe(wait_status: int | None) -> tuple[int | None, str]:
    if wait_status is None:
        return None, "the process ended without reporting"
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        return -sig, f"the process was killed by signal {sig} ({signal.Signals(sig).name})"
    code = os.WEXITSTATUS(wait_status)
    return code, f"the process exited with code {code}"


PROMOTION_MARGIN_S = 0.05  # a cell promotes itself only this long before its deadline or earlier


@dataclasses.dataclass
class ReadyCell:
    """P's handles on the state's forked, waiting cell process."""

    chan: socket.socket | None  # None once it is the new state's channel
    pidfd: int
    out_r: int
    err_r: int
    proc_pid: int | None  # its pid as /proc names it, from its own "ready" (no code had run)

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
        self.own_proc_pid = int(os.readlink("/proc/self"))
        self.cells = 0
        signal.signal(signal.SIGCHLD, self._on_child)  # P reaps everything (it is the init)
        self.prepare()

    @staticmethod
    def _on_child(*_):
        reap_children()

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
        self.set_state(mine, _proc_pid(pidfd))
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
                send_msg(self.state, {"op": "fork"}, fds=[theirs.fileno()])
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
        its process limit for longer than the patience of `_fork_when_possible`) is replaced
        by a fresh one, once."""
        if self.cell is not None:
            return self.cell
        if self.state is None and keep:
            notes.append("the previous state was lost; this cell ran in a fresh session")
        self.prepare()
        chan, self.ordered = self.ordered, None
        try:
            if chan is None:
                raise ProtocolError("no state to fork")
            ready, _, fds = recv_msg_within(chan, 10.0, max_payload=0, max_fds=3)
            if ready.get("op") == "fork_failed":
                chan.close()
                notes.append(f"{ready.get('error')}; state was reset")
                self.kill_all()
                return self.ready_cell(notes, keep, retry=False) if retry else None
            if ready.get("op") != "ready" or len(fds) != 3:
                for fd in fds:
                    os.close(fd)
                raise ProtocolError("the cell process did not get ready")
            proc_pid = ready.get("proc_pid")
            self.cell = ReadyCell(chan, *fds, proc_pid if type(proc_pid) is int else None)
            return self.cell
        except (ProtocolError, OSError):
            if chan is not None:
                chan.close()
            notes.append("the session's state process was gone; state was reset")
            self.kill_all()
            return None

    def run(self, code: bytes, timeout_s: float, keep: bool) -> tuple[dict, bytes]:
        """One cell. With keep=False the cell never becomes the state (and the caller resets the
        session's files afterwards): the next call starts from the same pristine state."""
        notes: list[str] = []
        cell_number = self.cells + 1 if keep else 1  # a stateless call is always the first cell
        self.cells += keep
        limit = int(self.settings["max_output_bytes"])
        out, err = OutputBuffer(limit), OutputBuffer(limit)
        status = None
        cell = self.ready_cell(notes, keep)
        t0 = time.monotonic()  # the wall time counts from the order to the cell
        deadline = t0 + timeout_s
        promoted = False
        if cell is None:
            status = "crashed"  # nothing ran
        else:
            self.cell = None  # used up by this call, whatever happens
            # A cell may promote itself until PROMOTION_MARGIN_S before the deadline, when this
            # supervisor would kill it: a cell that finishes later asks (the "promote" order).
            order = {"op": "run", "cell": cell_number, "cpu_s": int(timeout_s) + 1, "keep": keep,
                     "promote_by": deadline - PROMOTION_MARGIN_S}
            try:
                send_msg(cell.chan, order, code)
            except OSError:
                pass  # it died waiting; its pidfd says so below
        poller = select.poll()
        streams = {cell.out_r: out, cell.err_r: err} if cell else {}
        for fd in (cell.out_r, cell.err_r, cell.chan.fileno(), cell.pidfd) if cell else ():
            poller.register(fd, select.POLLIN)
        while status is None:
            left = deadline - time.monotonic()
            if left <= 0:
                status = "timeout"
                notes.append(f"timed out after {timeout_s:g} s")
                break
            for fd, _ in poller.poll(max(1, int(left * 1000))):
                if fd in streams:
                    data = os.read(fd, 1 << 20)
                    if data:
                        streams[fd].feed(data)
                    else:
                        poller.unregister(fd)
                elif fd == cell.chan.fileno():
                    try:
                        result, _, _ = recv_msg_within(cell.chan, 2.0, max_payload=0, max_fds=0)
                        status = result.get("status")
                        if status not in ("ok", "error", "memory"):
                            status = "crashed"
                        promoted = status == "ok" and keep and result.get("promoted") is True
                    except ProtocolError:
                        poller.unregister(fd)  # the code closed its channel; wait for its exit
                elif fd == cell.pidfd:
                    status = "crashed"
                if status is not None:
                    break
        wall = time.monotonic() - t0
        wait_status = None
        if cell is not None and status == "ok" and keep:
            if not promoted:
                try:
                    send_msg(cell.chan, {"op": "promote"})
                    ack, _, _ = recv_msg_within(cell.chan, 5.0, max_payload=0, max_fds=0)
                    promoted = ack.get("op") == "promoted"
                except (ProtocolError, OSError):
                    pass
            if promoted:  # the cell's channel is the new state's
                self.set_state(cell.chan, cell.proc_pid)
                cell.chan = None
            else:
                status = "crashed"
                notes.append("the cell could not be kept as the new state; state was reset")
                self.kill_all()
        elif cell is not None and self.state is not None and status != "crashed" and \
                self.cell_was_alone(cell):
            self.rollback_due = True  # nothing of the code is left: it can wait for the reply
        elif cell is not None and self.state is not None:
            try:
                send_msg(self.state, {"op": "rollback"})
                ack, _, _ = recv_msg_within(self.state, 5.0, max_payload=0, max_fds=0)
                wait_status = ack.get("wait_status")
            except (ProtocolError, OSError):
                if keep:
                    notes.append("the session's state process was gone; state was reset")
                self.kill_all()
        exit_code = None
        if status == "crashed" and cell is not None:
            exit_code, why = _describe(wait_status)
            notes.append(why)
            if exit_code == -signal.SIGXCPU:
                status, notes[-1] = "timeout", "CPU time limit exceeded"
        for fd, buf in streams.items():  # what the cell wrote before it ended is in the pipes
            os.set_blocking(fd, False)
            try:
                while data := os.read(fd, 1 << 20):
                    buf.feed(data)
            except BlockingIOError:
                pass
        if cell is not None:
            cell.close()
        stdout, stderr = out.value(), err.value()
        if notes and status != "ok":
            sep = b"\n" if stderr and not stderr.endswith(b"\n") else b""
            stderr += sep + "".join(f"[sandbox] {n}\n" for n in notes).encode()
        header = {"status": status, "wall_s": wall, "truncated": out.truncated or err.truncated,
                  "exit_code": exit_code, "stdout_len": len(stdout), "cell": cell_number}
        return header, stdout + stderr

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
        of_cell, of_state = _children(c), _children(s, {c})
        of_self = _children(self.own_proc_pid, {s})
        return (of_cell == set() and of_state is not None and of_state <= {c}
                and of_self is not None and of_self <= {s})

    def finish(self, keep: bool) -> None:
        """After the reply: the deferred rollback, the stateless call's file reset, and the
        order to fork the next call's cell process."""
        if self.rollback_due:
            self.rollback_due = False
            try:
                send_msg(self.state, {"op": "rollback"})
                recv_msg_within(self.state, 5.0, max_payload=0, max_fds=0)
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
        _, _, fds = recv_msg(handoff, max_payload=0, max_fds=1)
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
                order, code, _ = recv_msg(client, max_fds=0)
            except ProtocolError:
                break
            if order.get("op") != "run":
                break
            timeout = min(float(order["timeout_s"]), float(settings["max_timeout_s"]))
            keep = bool(order.get("keep", True))
            header, payload = session.run(code, timeout, keep)
            send_msg(client, header, payload)
            session.finish(keep)  # off the caller's path
    except OSError:
        pass
    finally:
        client.close()
        session.close()


# ---------------------------------------------------------------------------------------------
# The server process.
# ---------------------------------------------------------------------------------------------
def spawn_session(settings: dict, own_pidns: int | None) -> socket.socket:
    """Fork a pooled session supervisor P (pid 1 of a new pid namespace when `own_pidns` is
    given); returns the socket used to hand it a caller."""
    mine, theirs = socket.socketpair()
    uid = random.randrange(settings["uid_base"], settings["uid_base"] + (1 << 24)) \
        if settings["separate_uid"] else None
    if own_pidns is None:
        pid = os.fork()
    else:
        unshare(CLONE_NEWPID)  # the next child is pid 1 of a new namespace...
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0:  # ...and only that one
                _check(_libc.setns(own_pidns, CLONE_NEWPID), "setns")
    if pid == 0:
        try:
            mine.close()
            keep = theirs.fileno()  # P holds nothing of the server's but its own channel
            os.closerange(3, keep)
            os.closerange(keep + 1, 1 << 16)
            scoped = own_pidns is not None or uid is not None
            session_main(theirs, settings, uid, scoped)
        finally:
            os._exit(0)
    theirs.close()
    return mine


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    set_name(b"sandbox-server")
    settings = json.loads(sys.argv[2])
    protections = {"private_tmp": False, "hidden_home": False}
    if settings["private_fs"]:
        private_filesystem(int(settings["scratch_mb"]))
        protections.update(private_tmp=True, hidden_home=True)
    if settings["separate_uid"] and os.geteuid() != 0:
        settings["separate_uid"] = False
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY) if settings["pid_namespace"] else None
    preload(settings["preload"])
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are reaped by the kernel
    pool = [spawn_session(settings, own_pidns) for _ in range(int(settings["pool_size"]))]
    send_msg(control, {"op": "ready", "pid": os.getpid(), "protections": protections,
                       "separate_uid": settings["separate_uid"]})
    while True:
        try:
            order, _, fds = recv_msg(control, max_payload=0, max_fds=1)
        except ProtocolError:
            return  # the caller is gone: returning ends this pid namespace and every session
        if order.get("op") != "open" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        while True:
            handoff = pool.pop(0) if pool else spawn_session(settings, own_pidns)
            try:
                send_msg(handoff, {"op": "attach"}, fds=fds)
                break
            except OSError:
                continue
            finally:
                handoff.close()
        os.close(fds[0])
        if len(pool) < int(settings["pool_size"]):
            pool.append(spawn_session(settings, own_pidns))


if __name__ == "__main__":
    main()
