"""The sandbox's root: the least of the host's filesystem that the interpreter needs.

The server builds it once, after its preloads, and moves into it (`minimal_root`); every session
gets a copy with its mount namespace. It holds, read-only, the system's library and program
directories (/usr and what links into it), the interpreter's prefixes, the directories of the
modules the server has imported, the sandbox package and `SandboxConfig.readable_paths`; a /dev
of six character devices; a /proc; empty temporary directories; and an /etc of copies. Nothing
else of the host is there: no home, no project, no /run, no host /tmp, no /sys (where sessions
have memory cgroups, /sys is the server's alone: a directory only root may enter, so that no
session reads another's counters).

Each host directory is shown through a read-only overlay of its own (lower layers: the directory
and an empty one), not a bind mount: a file opened through an overlay is an inode of the overlay,
so a lock the code takes on it (flock, POSIX or open-file-description locks) is not a lock on the
host's file, and a UNIX socket file there answers no connection (the socket is bound to the
host's inode). Where the kernel refuses an overlay, the directory is bind-mounted read-only
instead and `host_locks_private` is False. /etc holds copies, never the host's inodes.
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys

from .linux import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    libc,
    mount,
    umount,
)

SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
"""Shown as they are on the host (a symbolic link stays one)."""
ETC_COPIES = ("/etc/ld.so.cache", "/etc/localtime")
"""Copied into the root's /etc: the dynamic linker's cache, the local time zone."""
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9)}
DEVICES["tty"] = (5, 0)
FIXED_DIRS = ("/dev", "/etc", "/proc", "/tmp", "/var/tmp")
"""Directories the root always has, besides the host's directories it shows."""

_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)
"""pivot_root(2)'s system call number (glibc has no wrapper); None on another machine."""


def _realpath(p: str) -> str | None:
    return os.path.realpath(p) if p and os.path.exists(p) else None


def shown_directories(readable: list[str], package_dir: str) -> list[str]:
    """The host directories the root shows, outermost only: the system's, the interpreter's
    prefixes and its standard library, the top-level package (or module file) of each imported
    module that lives elsewhere, this package, and `readable`."""
    prefixes = {
        _realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    }
    paths = {p for p in prefixes if p}
    paths |= {os.path.dirname(p) for p in [_realpath(sys.executable)] if p}
    paths |= {p for d in SYSTEM_DIRS if os.path.isdir(d) and not os.path.islink(d) for p in [d]}
    paths |= {p for p in map(_realpath, readable) if p}
    paths.add(os.path.realpath(package_dir))
    entries = sorted({p for p in map(_realpath, sys.path) if p}, key=len, reverse=True)
    for module in list(sys.modules.values()):
        file = _realpath(getattr(module, "__file__", None) or "")
        if file is None or any(file.startswith(p + "/") for p in paths):
            continue
        entry = next((e for e in entries if file.startswith(e + "/")), None)
        if entry is None:
            paths.add(os.path.dirname(file))
        else:  # the top-level package that holds it, not the whole sys.path entry
            paths.add(os.path.join(entry, os.path.relpath(file, entry).split("/")[0]))
    return sorted(p for p in paths if not any(p.startswith(q + "/") for q in paths))


def minimal_root(staging: str, readable: list[str], package_dir: str, cgroups: str | None):
    """Build the root at `staging` (an empty directory of this mount namespace, which must be
    private) and make it this process's root. `cgroups`, where sessions have memory cgroups, is
    the host's cgroup mount that the server keeps at its own path under a root-only /sys.
    Returns (the host paths shown, whether every directory is an overlay). Raises OSError where
    the kernel refuses a step; the process's root is then unchanged."""
    if _PIVOT_ROOT is None:
        raise OSError("pivot_root: unknown machine")
    mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755")
    try:
        return _build(staging, readable, package_dir, cgroups)
    except BaseException:
        umount(staging)
        raise


def _build(new: str, readable: list[str], package_dir: str, cgroups: str | None):
    empty = f"{new}.empty"  # each overlay's second lower layer, outside the root
    os.mkdir(empty, 0o555)
    for d in ("/tmp", "/var/tmp"):  # first: a readable path may lie below
        os.makedirs(new + d, 0o755, exist_ok=True)
        mount("tmpfs", new + d, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755")
    shown = shown_directories(readable, package_dir)
    private_locks = True
    for path in shown:
        target = new + path
        if os.path.isdir(path):
            os.makedirs(target, 0o755, exist_ok=True)
            private_locks &= _show_directory(path, target, empty)
        else:  # a module file: bound read-only (a lock on it is the host's)
            os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
            open(target, "w").close()
            _bind_read_only(path, target)
            private_locks = False
    for path in (*SYSTEM_DIRS, sys.prefix, sys.base_prefix, sys.executable, *sys.path, *readable):
        _links(new, os.path.abspath(path))
    _make_dev(os.path.join(new, "dev"))
    os.makedirs(os.path.join(new, "etc"), 0o755, exist_ok=True)
    for f in ETC_COPIES:
        if os.path.isfile(f):
            with open(f, "rb") as src, open(new + f, "wb") as dst:
                dst.write(src.read())
    os.makedirs(new + "/proc", 0o555, exist_ok=True)
    mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if cgroups is not None:
        os.mkdir(new + "/sys", 0o700)
        os.makedirs(new + cgroups, 0o755)
        mount(cgroups, new + cgroups, None, MS_BIND | MS_REC)
    _pivot(new)
    # the root's own files are fixed from here on
    mount(None, "/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "size=64k")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=16m")
    return shown, private_locks


def _links(new: str, path: str) -> None:
    """Recreate in the root each symbolic link on the way to host path `path` (a venv reached
    through a link, /lib64 -> usr/lib64), so that the path the interpreter knows resolves there
    as it does on the host."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/" + "/".join(parts[:i])
        if not os.path.islink(prefix) or os.path.lexists(new + prefix):
            continue
        os.makedirs(os.path.dirname(new + prefix), 0o755, exist_ok=True)
        os.symlink(os.readlink(prefix), new + prefix)


def _show_directory(path: str, target: str, empty: str) -> bool:
    """Show host directory `path` read-only at `target`: an overlay (True), or where the kernel
    refuses one, a read-only bind mount (False)."""
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV
    if "," not in path and ":" not in path:  # what overlay options cannot spell
        try:
            mount("overlay", target, "overlay", flags, f"lowerdir={path}:{empty}")
            return True
        except OSError:
            pass
    _bind_read_only(path, target)
    return False


def _bind_read_only(path: str, target: str) -> None:
    mount(path, target, None, MS_BIND)
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _make_dev(dev: str) -> None:
    """A /dev of its own: the six character devices every program may use (made where this
    process may, bound from the host's where it may not), /dev/shm and /dev/pts to mount
    over, /dev/ptmx to bind a devpts multiplexer onto, and the usual links into /proc."""
    os.mkdir(dev, 0o755)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name, (major, minor) in DEVICES.items():
        path = os.path.join(dev, name)
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(path, 0o666)
        except OSError:
            if os.path.exists(f"/dev/{name}"):
                open(path, "w").close()
                mount(f"/dev/{name}", path, None, MS_BIND)
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    os.chmod(os.path.join(dev, "shm"), 0o1777)
    os.mkdir(os.path.join(dev, "pts"), 0o755)
    open(os.path.join(dev, "ptmx"), "w").close()
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, os.path.join(dev, name))


def _pivot(new: str) -> None:
    """Make `new` the root of this mount namespace and detach the old one (pivot_root with
    both arguments ".", as container runtimes do: no directory for the old root is needed)."""
    os.chdir(new)
    if libc.syscall(_PIVOT_ROOT, b".", b".") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root: {os.strerror(err)}")
    umount(".")
    os.chdir("/")
