"""Memory cgroups (v1 and v2): one per session, with a hard limit that counts every page its
processes hold (memfd, shared memory and tmpfs pages included), and its OOM kills."""

from __future__ import annotations

import os
import time

from .linux import read_proc


def memory_cgroup_base() -> tuple[str, bool] | None:
    """(the directory of this process's memory cgroup, whether it is cgroup v2) where this
    process may create cgroups below it; None where it may not (no memory controller, or not
    writable)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v1 = [ln.split(":", 2)[2] for ln in lines if "memory" in ln.split(":", 2)[1].split(",")]
    unified = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
    candidates = []
    if v1 and os.path.isdir("/sys/fs/cgroup/memory"):
        candidates.append(("/sys/fs/cgroup/memory" + v1[0].rstrip("/"), False))
    if unified:
        for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
            try:
                with open(f"{root}/cgroup.controllers") as f:
                    if "memory" in f.read().split():
                        candidates.append((root + unified[0].rstrip("/"), True))
                        break
            except OSError:
                pass
    for path, v2 in candidates:
        if os.path.isdir(path) and os.access(path, os.W_OK):
            return path, v2
    return None


def make_parent_cgroup(path: str, v2: bool) -> bool:
    """Create (or keep) the cgroup `path`, below which memory cgroups are made (on v2, it hands
    the memory controller down); False where it cannot be."""
    try:
        os.makedirs(path, 0o755, exist_ok=True)
        if v2:
            with open(os.path.join(path, "cgroup.subtree_control"), "w") as f:
                f.write("+memory")
        return True
    except OSError:
        remove_cgroup(path)
        return False


def make_memory_cgroup(path: str, limit_bytes: int, v2: bool) -> bool:
    """Create the cgroup `path` with a hard memory limit (no swap); False where it cannot be."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except OSError:
        return False
    names = (
        ("memory.max", "memory.swap.max")
        if v2
        else ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
    )
    try:
        with open(os.path.join(path, names[0]), "w") as f:
            f.write(str(limit_bytes))
    except OSError:
        remove_cgroup(path)
        return False
    try:
        with open(os.path.join(path, names[1]), "w") as f:
            f.write("0" if v2 else str(limit_bytes))
    except OSError:
        pass  # no swap accounting on this machine
    return True


def join_cgroup(path: str) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write("0")


def oom_kills(path: str, v2: bool) -> int:
    """How many processes the kernel's OOM killer has killed in the cgroup `path`."""
    try:
        text = read_proc(os.path.join(path, "memory.events" if v2 else "memory.oom_control"))
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(b"oom_kill "):
            return int(line.split()[1])
    return 0


def remove_cgroup(path: str, patience_s: float = 0.0) -> None:
    """Remove the cgroup `path` and the cgroups below it, waiting up to `patience_s` for the
    processes that are still leaving them; best effort."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            for entry in os.scandir(path):
                if entry.is_dir(follow_symlinks=False):
                    remove_cgroup(entry.path)
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
