"""A session's jail: the kernel objects that one session's processes share with no one else.

The supervisor P enters it as it is forked into the pool, off every caller's path: its own mount,
IPC and network namespaces (`isolate_session`), a scratch directory and shared temporary
directories that are tmpfs mounts of its own, sized `scratch_mb`, an mqueue filesystem where only
P reaches the session's POSIX message queues, and a memory cgroup limited to `memory_mb` that the
state joins (`SessionJail`). After a stateless call, `fresh_files` gives the next call files as
fresh as the first call's. docs/sandbox.md ("Isolation per session") says what each costs.
"""

from __future__ import annotations

import os
import random
import stat

from .cgroups import make_memory_cgroup, make_parent_cgroup, oom_kills, remove_cgroup
from .linux import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
    SHARED_TMP_DIRS,
    mount,
    remove_ipc_objects,
    remove_tree,
    umount,
    unshare,
)
from .processes import remember_nested_pid_namespace


def isolate_session(own_pid_namespace: bool = False) -> None:
    """P's own mount, IPC and network namespaces (children inherit them): SysV IPC, POSIX message
    queues, abstract UNIX sockets and /dev/shm are the session's alone. When P is pid 1 of a pid
    namespace of its own (`own_pid_namespace`), /proc is that namespace's: the session's
    processes see theirs only, none of another session's or the server's."""
    unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    if own_pid_namespace and remember_nested_pid_namespace():
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    private_ptys()


def private_ptys() -> None:
    """A devpts instance of the session's own at /dev/pts, and /dev/ptmx its multiplexer: the
    ptys a session opens are not in another session's /dev/pts, nor in the host's. Where the
    machine has no /dev/pts to mount over, nothing changes."""
    if not os.path.isdir("/dev/pts"):
        return
    try:
        mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, PTY_OPTIONS)
    except OSError:
        return
    if os.path.exists("/dev/ptmx"):
        mount("/dev/pts/ptmx", "/dev/ptmx", None, MS_BIND)


PTY_OPTIONS = "newinstance,ptmxmode=0666,mode=0620"
"""A fresh devpts: its own numbering, a multiplexer anyone may open, ptys for their owner."""


class SessionJail:
    """The session's scratch directory, its own mounts and its memory cgroup. `settings` is the
    server's, plus the cgroup the state joins (`state.state_process` reads it)."""

    def __init__(self, settings: dict, uid: int | None):
        self.settings, self.uid = settings, uid
        self.own_mounts = bool(settings.get("session_namespaces"))
        self.scratch = os.path.join(
            settings["scratch_root"], f"toolgrpo-sbx-{os.getpid()}-{random.getrandbits(40):010x}"
        )
        os.makedirs(self.scratch, mode=0o700)
        self.cgroup = self.make_cgroup()
        self.oom_kills = 0  # the OOM kills of `cgroup` accounted for
        self.mqueue_dir = self.mount_mqueue() if self.own_mounts else None
        self.mounted: set[str] = set()  # the tmpfs mounts of the session's own
        self.fresh_files()

    def make_cgroup(self) -> str | None:
        """The session's memory cgroup (below the server's), limited to `memory_mb`: it counts
        what address-space limits do not, such as memfd and tmpfs pages. The state joins it, so
        every process of the code is in it; None where the machine allows none."""
        parent = self.settings.get("cgroup_parent")
        if parent is None:
            return None
        path = os.path.join(parent, f"session-{random.getrandbits(48):012x}")
        limit, v2 = int(self.settings["memory_mb"]) << 20, bool(self.settings.get("cgroup_v2"))
        for _ in range(2):  # the last session to close removes the parent (`close`): make it again
            if make_memory_cgroup(path, limit, v2):
                break
            make_parent_cgroup(parent, v2)
        else:
            return None
        self.settings = {**self.settings, "cgroup": path}
        return path

    def mount_mqueue(self) -> str | None:
        """The session's POSIX message queues as files (an mqueue filesystem of its own IPC
        namespace), where only this supervisor reaches them."""
        path = f"{self.scratch}.mqueue"
        try:
            os.mkdir(path, 0o700)
            mount("mqueue", path, "mqueue", MS_NOSUID | MS_NODEV)
            return path
        except OSError:
            return None

    def memory_exceeded(self) -> bool:
        """Whether the kernel's OOM killer has killed a process of the session since last asked."""
        if self.cgroup is None:
            return False
        kills = oom_kills(self.cgroup, bool(self.settings.get("cgroup_v2")))
        exceeded, self.oom_kills = kills > self.oom_kills, kills
        return exceeded

    def fresh_files(self) -> None:
        """A fresh scratch directory and shared temporary directories for the next call. With
        mounts of its own, each is a new tmpfs (the scratch directory's sized `scratch_mb`, owned
        by the session's uid): nothing of a past call, extended attributes included, survives,
        and however the code filled a directory, this costs a mount, never a walk."""
        quota = f"size={int(self.settings['scratch_mb'])}m"
        owner = f",uid={self.uid},gid={self.uid}" if self.uid is not None else ""
        if self.own_mounts:
            remove_ipc_objects(self.mqueue_dir)  # IPC objects outlive the processes of a call
            for path, mode, options in (
                (self.scratch, 0o700, f"{quota},mode=700{owner}"),
                *((d, 0o1777, f"{quota},mode=1777") for d in SHARED_TMP_DIRS if os.path.isdir(d)),
            ):
                if path in self.mounted:
                    if _untouched(path, mode, self.uid if mode == 0o700 else 0):
                        continue  # a call that wrote nothing here leaves it as it was
                    umount(path)
                mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options)
                self.mounted.add(path)
            return
        remove_tree(self.scratch, keep_top=True)
        os.chmod(self.scratch, 0o700)
        if self.uid is not None:
            os.chown(self.scratch, self.uid, self.uid)
            for d in SHARED_TMP_DIRS:
                remove_tree(d, keep_top=True, owner=self.uid)

    def close(self) -> None:
        """Remove the cgroup (and the server's parent cgroup, if no other session has one below
        it any more), the mounts and the scratch directory; the session's processes are gone."""
        if self.cgroup is not None:
            remove_cgroup(self.cgroup, patience_s=1.0)
            try:
                os.rmdir(os.path.dirname(self.cgroup))
            except OSError:
                pass
        if self.own_mounts:  # the mounts end with the session; their mount points are the server's
            for path in (self.scratch, self.mqueue_dir):
                if path is not None:
                    try:
                        umount(path)
                        os.rmdir(path)
                    except OSError:
                        pass
            return
        if self.uid is not None:
            for d in SHARED_TMP_DIRS:
                remove_tree(d, keep_top=True, owner=self.uid)
        remove_tree(self.scratch)


def _untouched(path: str, mode: int, uid: int | None) -> bool:
    """Whether a fresh tmpfs at `path` is still as it was mounted: empty, without extended
    attributes, with its mode and owner. (Nothing else of a tmpfs root can be changed by a
    process that does not own the mount.)"""
    st = os.lstat(path)
    return (
        stat.S_IMODE(st.st_mode) == mode
        and st.st_uid == (uid or 0)
        and not os.listdir(path)
        and not os.listxattr(path)
    )
