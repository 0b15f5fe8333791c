"""The sandbox's minimal root (envs/sandbox/root.py): what a cell sees of the host's filesystem,
that what it sees is read-only and takes no lock and reaches no socket of the host's, and that
no cgroup counter is readable. Each hostile snippet aims only at files and a socket this test
made, so a failed containment harms nothing."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

import pytest
from sandboxes import FAST, need

from toolgrpo.envs.sandbox import PythonSandbox
from toolgrpo.envs.sandbox.root import FIXED_DIRS, SYSTEM_DIRS

REPO = Path(__file__).resolve().parents[2]


def test_the_root_holds_only_what_the_interpreter_needs(sandbox):
    need(sandbox, "minimal_root")
    shown = sandbox.visible_paths
    assert "/usr" in shown and not any(p == "/" or p.startswith("/etc") for p in shown)
    top = {p.split("/")[1] for p in (*shown, *FIXED_DIRS)}
    top |= {d[1:] for d in SYSTEM_DIRS if os.path.lexists(d)}
    if sandbox.protections["memory_cgroup"]:
        top.add("sys")  # the server's, closed to the code (next test)
    code = f"""
import json, os, subprocess, sys
print(json.dumps({{
    "top": sorted(os.listdir("/")),
    "etc": sorted(os.listdir("/etc")),
    "host": [p for p in ("/etc/passwd", "/etc/hostname", "/run", "/home", {str(REPO / "pyproject.toml")!r})
             if os.path.lexists(p)],
    "python": subprocess.run([sys.executable, "-c", "import numpy; print(7 * 6)"],
                             capture_output=True, text=True).stdout.strip(),
    "shown": all(os.path.isdir(p) or os.path.isfile(p) for p in {list(shown)!r}),
}}))
"""
    r = sandbox.run(code, timeout_s=30)
    assert r.status == "ok", r.stderr
    seen = json.loads(r.stdout)
    assert set(seen["top"]) == top
    assert set(seen["etc"]) <= {"ld.so.cache", "localtime"}
    assert seen["host"] == []  # not the host's /etc or /run, nor the project on sys.path
    assert seen["python"] == "42"  # a new interpreter starts in the root, with its packages
    assert seen["shown"]


def test_cgroup_counters_are_unreadable(sandbox):
    need(sandbox, "memory_cgroup", "cgroups_hidden")
    code = """
import os
tried, read = 0, []
for line in open("/proc/self/cgroup").read().splitlines():
    _, controllers, path = line.split(":", 2)
    for base in ("/sys/fs/cgroup", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified"):
        for cg in (path, os.path.dirname(path), "/"):
            for name in ("memory.peak", "memory.current", "memory.max_usage_in_bytes",
                         "memory.usage_in_bytes", "memory.stat"):
                tried += 1
                try:
                    read.append(open(base + cg.rstrip("/") + "/" + name).read()[:20])
                except OSError:
                    pass
try:
    os.listdir("/sys")
    print("listed /sys")
except PermissionError:
    pass
print(tried, read)
"""
    r = sandbox.run(code)
    assert r.status == "ok", r.stderr
    tried, read = r.stdout.split(" ", 1)
    assert int(tried) > 0 and read.strip() == "[]"


@pytest.fixture
def listener(tmp_path):
    """A directory of the test's with a file any user may write and a UNIX socket any user may
    connect to (the socket's listener): what a minimal root must show read-only, unlockable
    and unreachable."""
    (tmp_path / "open.txt").write_text("data\n")
    os.chmod(tmp_path / "open.txt", 0o666)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        sock.listen()
        sock.setblocking(False)
        os.chmod(tmp_path / "sock", 0o777)
        yield sock


def test_a_readable_path_is_read_only_and_private(listener, tmp_path):
    host_dir = tmp_path
    os.chmod(host_dir, 0o755)  # the code reads what its unprivileged user may read there
    with PythonSandbox(FAST, readable_paths=(str(host_dir),)) as sb:
        need(sb, "minimal_root", "host_locks_private")
        assert str(host_dir) in sb.visible_paths
        with sb.session() as s:
            r = s.run(f"""
import errno, fcntl, os, socket
f = open({str(host_dir / "open.txt")!r})
print(f.read().strip())
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)   # taken: on the overlay's inode
g = open({str(host_dir / "open.txt")!r})
fcntl.lockf(g, fcntl.LOCK_SH | fcntl.LOCK_NB)
try:
    open({str(host_dir / "open.txt")!r}, "a")
    print("wrote")
except OSError as e:
    print(errno.errorcode[e.errno])
c = socket.socket(socket.AF_UNIX)
try:
    c.connect({str(host_dir / "sock")!r})
    print("connected")
except OSError as e:
    print(errno.errorcode[e.errno])
""")
            assert r.status == "ok", r.stderr
            assert r.stdout.split() == ["data", "EROFS", "ECONNREFUSED"]
            # the kept state holds both locks now; neither is on the host's file
            with open(host_dir / "open.txt", "r+") as mine:
                fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.lockf(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert s.run("print(f.closed, g.closed)").stdout.split() == ["False", "False"]
    with pytest.raises(BlockingIOError):
        listener.accept()  # no one connected


def test_readable_paths_are_checked():
    with pytest.raises(ValueError, match="absolute"):
        PythonSandbox(FAST, readable_paths=("data",))
    with pytest.raises(ValueError, match="not a directory"):
        PythonSandbox(FAST, readable_paths=("/nonexistent-toolgrpo-dir",)).start()
