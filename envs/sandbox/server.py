"""The sandbox server: a pre-warmed interpreter that forks contained Python sessions.

`PythonSandbox` (client.py, launch.py) starts the server as a fresh interpreter (never a fork of the caller,
so none of the caller's memory or secrets is copied), inside new mount, network and pid
namespaces where the machine allows. It imports the scientific stack once, then serves sessions:

    server ──unshare(pid) + fork──► P  (pid 1 of the session's own pid namespace; its own
                                     │   mount, IPC and network namespaces; root)
                                     └─fork─► S  (state: the session's globals; the pristine one
                                               │  root, a kept one uid X; in the session's cgroup)
                                               └─fork─► C  (runs one cell; uid X)

The server keeps a few sessions ready (P and S forked and warmed up) and hands one to each caller
that opens a session. P (supervisor.py) supervises its session and talks to the caller over a
socket of its own. The next cell's process C (cell.py) is made before the cell exists: once the
caller has a result, P orders S (state.py) to fork C, handing S the channel C will use; C takes
its copy-on-write faults in a warm-up run, makes its output pipes and hands P its pidfd and their
read ends over that channel; a call then only sends C the code. S does as little as it can while
C lives (each page it writes then is a copied page), and forks without CPython's after-fork hooks
when it has no other thread (`processes.lean_fork`). The processes name themselves (sandbox-server,
-super, -state, -cell) for ps. C runs the cell with stdout/stderr on the pipes that P drains, and
reports its status. If the cell succeeds (and the session keeps state), C becomes the new state
and kills every other process of the session (the old state, and whatever the code started),
which P checks before it believes it; otherwise S kills C and everything C started and stays
the state, which P checks too (supervisor.py, checks.py). Stateless calls use the same
path but never promote. "Kill every other process" is `kill(-1, SIGKILL)`, which is scoped: it
only reaches the session's own pid namespace (or, without namespaces, the session's own uid), and
it is never used where neither scope holds. A discarded cell is killed by P at once; when the
kernel's lists of children show that it was the only process of the code, S's scoped kill waits
until the caller has its answer (`checks.cell_was_alone`). docs/sandbox.md says where a call's
time goes and why the design is as it is.

How the server imports its modules. It runs as `python -I` (isolated: no PYTHONPATH, no user
site-packages, no script directory on sys.path), so that nothing of the caller's environment
decides what it imports. The package is therefore not importable by name, and importing it as
`toolgrpo.envs.sandbox` would run `envs/__init__.py`, which imports Gymnasium. Instead the client starts
`python -I -c <SERVER_BOOTSTRAP>` (launch.py), which registers this directory as a package of its
own under the top-level name `sandbox`, without running its `__init__.py` (whose re-exports of
the client are not needed here), and calls `sandbox.server.main`. The modules import each other
relatively, and none imports anything outside the standard library at module level, so the
server imports the same standard modules it did as one file before it preloads (`preload`). No
directory is added to sys.path, so the other modules of `envs/` are not importable by the code
either. This works wherever the package's files are, a source tree or an installed wheel alike:
the client passes the directory of launch.py.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import random
import signal
import socket
import sys

from .cgroups import make_parent_cgroup, memory_cgroup_base, remove_cgroup
from .linux import (
    CLONE_NEWPID,
    CLOSED_TMP_DIRS,
    MS_BIND,
    MS_NODEV,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
    SHARED_TMP_DIRS,
    join_fresh_session_keyring,
    keyrings_deniable,
    libc,
    mount,
    set_name,
    setns,
    unshare,
)
from .processes import reap_children
from .protocol import Attach, BadMessage, Open, ProtocolError, ServerReady, recv, send
from .root import minimal_root
from .supervisor import session_main


# -- start-up: a private filesystem view, preloaded modules ----------------------------------------
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


def private_filesystem(scratch_mb: int, readable: list[str]) -> None:
    """In the server's own mount namespace: fresh tmpfs over the temporary directories, and
    directories closed to other users (such as /root, with its tokens and caches) replaced by an
    empty tmpfs. What the interpreter needs (its prefix, its packages, the project on sys.path)
    is shown again at its own path inside whatever was covered, even if it lives under /tmp, and
    so are the `readable` paths."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    tmp_dirs = [d for d in CLOSED_TMP_DIRS + SHARED_TMP_DIRS if os.path.isdir(d)]
    needed = {
        os.path.realpath(p)
        for p in (sys.prefix, sys.base_prefix, sys.executable, *sys.path, *readable)
        if p and os.path.exists(p)
    }
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
    (a page a child writes is split off and copied alone). Only memory in use now is collapsed;
    later allocations follow the machine's THP policy. Best effort: where the kernel refuses,
    pages stay as they are."""
    madvise = libc.madvise
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
        for chunk in range(
            -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE, HUGE_PAGE
        ):
            madvise(chunk, HUGE_PAGE, MADV_COLLAPSE)


def session_cgroups(settings: dict) -> str | None:
    """A memory cgroup of this server's, below which each session gets one of its own (where
    the machine lets this process create cgroups, with hierarchical limits): its path, or None.
    The parent has no limit of its own; each session's is `memory_mb`."""
    if not settings["separate_uid"]:
        return None
    base = memory_cgroup_base()
    if base is None:
        return None
    path, v2 = base
    parent = os.path.join(path, f"toolgrpo-sandbox-{os.getpid()}-{random.getrandbits(32):08x}")
    settings["cgroup_v2"] = v2
    return parent if make_parent_cgroup(parent, v2) else None


def enter_minimal_root(settings: dict, readable: list[str]) -> tuple[list[str], bool]:
    """Move into the minimal root (root.py), built in this namespace's private /tmp: the host
    paths it shows, and whether locks there are private; ([], False) where the kernel refused
    a step, with the reason on stderr, and the filesystem as it was."""
    staging = f"/tmp/.sandbox-root-{os.getpid()}"
    cgroups = "/sys/fs/cgroup" if settings["cgroup_parent"] else None
    try:
        os.mkdir(staging, 0o755)
        return minimal_root(staging, readable, os.path.dirname(__file__), cgroups)
    except OSError as exc:
        print(
            f"sandbox: no minimal root ({exc}); the host's filesystem stays visible",
            file=sys.stderr,
        )
        return [], False


# -- serving ---------------------------------------------------------------------------------------
def spawn_session(settings: dict, own_pidns: int | None) -> socket.socket:
    """Fork a pooled session supervisor P (pid 1 of a new pid namespace when `own_pidns` is
    given); returns the socket used to hand it a caller."""
    mine, theirs = socket.socketpair()
    uid = (
        random.randrange(settings["uid_base"], settings["uid_base"] + (1 << 24))
        if settings["separate_uid"]
        else None
    )
    if own_pidns is None:
        pid = os.fork()
    else:
        unshare(CLONE_NEWPID)  # the next child is pid 1 of a new namespace...
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0:  # ...and only that one
                setns(own_pidns, CLONE_NEWPID)
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
    """The server: argv holds its control socket's descriptor and its settings (JSON)."""
    control = socket.socket(fileno=int(sys.argv[1]))
    set_name(b"sandbox-server")
    settings = json.loads(sys.argv[2])
    join_fresh_session_keyring()  # the caller's session keyring is not the server's
    own = settings["private_fs"]  # namespaces of its own: so may each session have them
    settings["session_namespaces"] = own
    if settings["separate_uid"] and os.geteuid() != 0:
        settings["separate_uid"] = False
    protections = {
        "private_tmp": own,
        "hidden_home": own,
        "session_ipc": own,
        "session_network": own,
        "session_shm": own,
        "session_proc": own and bool(settings["pid_namespace"]),
        "session_ptys": own and os.path.isdir("/dev/pts"),
        "scratch_per_call": own,
        "scratch_quota": own,
        "keyrings_denied": keyrings_deniable(),
        "state_untouchable": settings["separate_uid"],
    }
    readable = list(settings.get("readable", []))
    if own:
        private_filesystem(int(settings["scratch_mb"]), readable)
    settings["cgroup_parent"] = session_cgroups(settings)
    protections["memory_cgroup"] = settings["cgroup_parent"] is not None
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY) if settings["pid_namespace"] else None
    preload(settings["preload"])
    shown, protections["minimal_root"], protections["host_locks_private"] = [], False, False
    if own:
        shown, protections["host_locks_private"] = enter_minimal_root(settings, readable)
        protections["minimal_root"] = bool(shown)
    protections["cgroups_hidden"] = protections["minimal_root"]
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are reaped by the kernel
    pool = [spawn_session(settings, own_pidns) for _ in range(int(settings["pool_size"]))]
    send(control, ServerReady(os.getpid(), protections, settings["separate_uid"], shown))
    while True:
        try:
            _, _, fds = recv(control, Open)
        except BadMessage:
            continue  # its descriptors are closed
        except ProtocolError:  # the caller is gone: end every session, then this server
            if own_pidns is not None and os.getpid() == 1:  # init of the server's namespace
                os.kill(-1, signal.SIGKILL)
                reap_children()
            if settings["cgroup_parent"] is not None:
                remove_cgroup(settings["cgroup_parent"], patience_s=2.0)
            return
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        while True:
            handoff = pool.pop(0) if pool else spawn_session(settings, own_pidns)
            try:
                send(handoff, Attach(), fds=fds)
                break
            except OSError:
                continue
            finally:
                handoff.close()
        os.close(fds[0])
        if len(pool) < int(settings["pool_size"]):
            pool.append(spawn_session(settings, own_pidns))
