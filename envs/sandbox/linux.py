"""Linux primitives the server side uses to set a process up: namespaces, mounts, prctl, the
keyring filter, IPC cleanup, rlimits and tree removal (processes.py has forks, kills and /proc).
Standard library only (ctypes for what Python 3.11's os module lacks)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

# PyDLL: calls keep the GIL, as os.fork() does (`lean_fork`); every caller is single-threaded.
libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.shmctl.argtypes = libc.msgctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWPID = 0x20000, 0x08000000, 0x40000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_DUMPABLE, PR_SET_NAME, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 4, 15, 36, 38
PR_SET_TIMERSLACK = 29

CLOSED_TMP_DIRS = ("/tmp", "/var/tmp")  # root-owned 755: code writes in its scratch dir only
SHARED_TMP_DIRS = ("/dev/shm", "/run/lock")  # sticky 1777 (POSIX semaphores live in /dev/shm),
# emptied of a session's files whenever the session is reset or closed


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# -- namespaces, mounts, process attributes --------------------------------------------------------
def unshare(flags: int) -> None:
    check(libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    check(libc.setns(fd, nstype), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
    enc = lambda s: None if s is None else s.encode()
    check(
        libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
        f"mount {target}",
    )


def umount(target: str) -> None:
    """Detach the mount at `target` (lazily: it is freed when its last user lets go)."""
    check(libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def prctl(option: int, arg: int) -> None:
    check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def set_name(name: bytes) -> None:
    """The process's name as `ps` and `top` show it (at most 15 bytes)."""
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


CELL_OOM_SCORE_ADJ = 1000
"""A cell's OOM score adjustment: the highest, so that the OOM killer of the session's memory
cgroup takes the cell that went over, not the state it forked from."""
STATE_OOM_SCORE_ADJ = 0
"""A kept state's (the supervisor sets it when a cell becomes the state)."""


def set_oom_score_adj(pid: int | str, value: int) -> bool:
    """Write /proc/PID/oom_score_adj ("self" for this process); False where it may not (lowering
    it below what a privileged writer set needs CAP_SYS_RESOURCE)."""
    try:
        fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, str(value).encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# -- keyrings and seccomp --------------------------------------------------------------------------
_MACHINE = os.uname().machine
# (seccomp's AUDIT_ARCH of this machine, syscall numbers of add_key, request_key, keyctl)
_KEY_SYSCALLS = {
    "x86_64": (0xC000003E, (248, 249, 250)),
    "aarch64": (0xC00000B7, (217, 218, 219)),
}.get(_MACHINE)
KEYCTL_JOIN_SESSION_KEYRING = 1
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


def join_fresh_session_keyring() -> bool:
    """Replace this process's session keyring with a new, empty, anonymous one (children inherit
    it): nothing of the caller's session keyring is reachable from here on. False where the
    machine is unknown or the kernel refuses."""
    if _KEY_SYSCALLS is None:
        return False
    return libc.syscall(_KEY_SYSCALLS[1][2], KEYCTL_JOIN_SESSION_KEYRING, None) >= 0


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def key_filter_program(arch: int, numbers: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """A seccomp BPF program (code, jt, jf, k) that fails with EPERM the system calls `numbers`,
    every call of another ABI than `arch` (i386 through int 0x80, x32) and allows the rest."""
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, eperm = 0x7FFF0000, 0x00050000 | 1
    n = len(numbers)
    prog = [
        (ld_abs, 0, 0, 4),  # seccomp_data.arch
        (jeq, 1, 0, arch),
        (ret, 0, 0, eperm),
        (ld_abs, 0, 0, 0),  # seccomp_data.nr
        (jge, n + 1, 0, 0x40000000),
    ]  # x32 numbers
    prog += [(jeq, n - i, 0, nr) for i, nr in enumerate(numbers)]
    return prog + [(ret, 0, 0, allow), (ret, 0, 0, eperm)]


def keyrings_deniable() -> bool:
    """Whether `deny_keyrings` can work here: a known machine, a kernel with seccomp filters."""
    try:
        with open("/proc/self/status") as f:
            return _KEY_SYSCALLS is not None and "Seccomp:" in f.read()
    except OSError:
        return False


def deny_keyrings() -> bool:
    """Install a seccomp filter (inherited by every child) that fails add_key, request_key and
    keyctl with EPERM: the code reaches no keyring, its session's or its uid's, so no key
    outlives a call. Needs no_new_privs (or root). False where the machine is unknown."""
    if _KEY_SYSCALLS is None:
        return False
    prog = key_filter_program(*_KEY_SYSCALLS)
    filters = (_SockFilter * len(prog))(*(_SockFilter(*insn) for insn in prog))
    fprog = _SockFprog(len(prog), filters)
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


# -- System V IPC and POSIX message queues --------------------------------------------------------
IPC_RMID = 0


def remove_ipc_objects(mqueue_dir: str | None) -> None:
    """Remove every System V shared memory segment, message queue and semaphore set of this
    process's IPC namespace (as /proc/sysvipc lists them) and every POSIX message queue in
    `mqueue_dir` (an mqueue filesystem mounted in that namespace)."""
    for kind, ctl in (("shm", libc.shmctl), ("msg", libc.msgctl), ("sem", libc.semctl)):
        try:
            lines = read_proc(f"/proc/sysvipc/{kind}").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 1:
                ctl(int(fields[1]), IPC_RMID, None) if kind != "sem" else ctl(
                    int(fields[1]), 0, IPC_RMID
                )
    if mqueue_dir is not None:
        try:
            names = os.listdir(mqueue_dir)
        except OSError:
            names = []
        for name in names:
            try:
                os.unlink(os.path.join(mqueue_dir, name))
            except OSError:
                pass


# -- resource limits -------------------------------------------------------------------------------
def limit_resources(
    memory_mb: int, max_file_mb: int, max_processes: int, max_open_files: int, cpu_s: int
) -> None:
    """Hard limits (soft = hard, so the code cannot raise them) of this process and its children;
    no core dumps."""
    mb = 1 << 20
    for res, value in (
        (resource.RLIMIT_AS, memory_mb * mb),
        (resource.RLIMIT_FSIZE, max_file_mb * mb),
        (resource.RLIMIT_NPROC, max_processes),
        (resource.RLIMIT_NOFILE, max_open_files),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_CPU, cpu_s),
    ):
        resource.setrlimit(res, (value, value))


def set_cpu_limit(soft_s: int | None) -> None:
    """This process's soft CPU-time limit (SIGXCPU when reached), under the hard one; None sets
    it back to the hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (hard if soft_s is None else soft_s, hard))


# -- files -----------------------------------------------------------------------------------------
def remove_tree(path: str, keep_top: bool = False, owner: int | None = None) -> None:
    """Remove `path` and everything under it without following links, iteratively (a tree of
    any depth costs no recursion), ignoring what cannot be removed; with `keep_top`, only its
    entries (with `owner`, only the top entries of that uid)."""
    stack: list[tuple[str, bool]] = []
    try:
        for entry in os.scandir(path):
            if owner is None or entry.stat(follow_symlinks=False).st_uid == owner:
                stack.append((entry.path, entry.is_dir(follow_symlinks=False)))
    except OSError:
        return
    if not keep_top:
        stack.insert(0, (path, True))
    while stack:
        entry_path, is_dir = stack[-1]
        if not is_dir:
            stack.pop()
            try:
                os.unlink(entry_path)
            except OSError:
                pass
            continue
        try:
            os.rmdir(entry_path)
            stack.pop()
            continue
        except OSError:
            pass
        try:
            entries = [(e.path, e.is_dir(follow_symlinks=False)) for e in os.scandir(entry_path)]
        except OSError:
            entries = []
        if not entries:  # cannot be emptied, or not removable when empty: leave it
            stack.pop()
            continue
        stack.extend(entries)


def read_proc(path: str) -> bytes:
    """A /proc file's whole text (raw os calls: this sits on a call's critical path)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
