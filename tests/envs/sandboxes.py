"""What the sandbox tests share: skipping a test whose protection this machine lacks, waiting,
and finding the processes a snippet left (read from /proc, never signalled)."""

from __future__ import annotations

import os
import time

import pytest

from toolgrpo.envs.sandbox import PythonSandbox, SandboxConfig

FAST = SandboxConfig(timeout_s=5.0, max_timeout_s=60.0)
"""The sandbox tests' default: a short timeout (tests/envs/conftest.py's `sandbox` uses it)."""


def need(sandbox: PythonSandbox, *names: str) -> None:
    off = [n for n in names if not sandbox.protections[n]]
    if off:
        pytest.skip(f"protection off on this machine: {', '.join(off)}")


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains `marker` (sees every pid namespace)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def wait_until(predicate, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def still_serves(sandbox: PythonSandbox) -> None:
    r = sandbox.run("print(6 * 7)")
    assert (r.status, r.stdout) == ("ok", "42\n"), r
