"""Launching the sandbox's server from the caller's process, and stopping it.

`start_server` runs the server (server.py) as a fresh interpreter, `python -I -c
SERVER_BOOTSTRAP`, inside util-linux `unshare` where the machine lets it create Linux namespaces,
with an allow-listed environment and one inherited socket, its control channel; it waits for the
server's ServerReady and says which protections hold. `stop_server` closes that channel, on which
the server, and with it every session it started, ends.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys

from .config import SandboxConfig, SandboxError
from .protocol import ProtocolError, ServerReady, recv

SERVER_BOOTSTRAP = f"""\
import sys, types
from importlib.machinery import ModuleSpec
package = sys.modules["sandbox"] = types.ModuleType("sandbox")
package.__spec__ = ModuleSpec("sandbox", None, is_package=True)
package.__path__ = package.__spec__.submodule_search_locations = [{os.path.dirname(os.path.abspath(__file__))!r}]
from sandbox.server import main
main()
"""
"""What `python -I -c` runs to start the server: this package's directory as the package `sandbox`,
without its __init__.py (server.py's docstring says why)."""
ENV_ALLOWLIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
FIXED_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONIOENCODING": "utf-8",
    "MPLBACKEND": "Agg",
    "USER": "sandbox",
    "LOGNAME": "sandbox",
}


@functools.cache
def _namespaces_work(user: bool) -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    flags = ["--user", "--map-root-user"] if user else []
    try:
        return (
            subprocess.run(
                [unshare, *flags, "--mount", "--net", "--pid", "--fork", "--mount-proc", "true"],
                capture_output=True,
                timeout=10,
                check=False,
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


def _isolation(cfg: SandboxConfig, root: bool) -> tuple[list[str], bool]:
    """The command prefix that runs the server in namespaces of its own, and whether it does:
    plain `unshare` as root, with a user namespace otherwise; none where they do not work (an
    error if the config insists on them)."""
    prefix: list[str] = []
    namespaces = False
    if cfg.isolation != "none":
        unshare = shutil.which("unshare")  # without it, namespaces do not work
        if root and unshare and _namespaces_work(user=False):
            prefix, namespaces = [unshare], True
        elif not root and unshare and _namespaces_work(user=True):
            prefix, namespaces = [unshare, "--user", "--map-root-user"], True
        elif cfg.isolation == "namespaces":
            raise SandboxError(
                "SandboxConfig.isolation='namespaces' but this machine cannot "
                "create Linux namespaces with util-linux `unshare`; use "
                "isolation='auto' to run with reduced containment"
            )
    if namespaces:
        prefix += [
            "--mount",
            "--net",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--propagation",
            "private",
        ]
    return prefix, namespaces


def _settings(cfg: SandboxConfig, namespaces: bool, root: bool) -> dict:
    """What the server is told on its command line. Raises ValueError for a readable path
    that is not a directory of this machine."""
    for path in cfg.readable_paths:
        if not os.path.isdir(path):
            raise ValueError(f"SandboxConfig.readable_paths: {path} is not a directory here")
    return {
        "private_fs": namespaces,
        "pid_namespace": namespaces,
        "separate_uid": root,
        "uid_base": 1 << 20,
        "scratch_root": "/tmp",
        "preload": list(cfg.preload),
        "memory_mb": cfg.memory_mb,
        "max_processes": cfg.max_processes,
        "max_file_mb": cfg.max_file_mb,
        "scratch_mb": cfg.scratch_mb,
        "max_output_bytes": cfg.max_output_bytes,
        "max_open_files": cfg.max_open_files,
        "max_timeout_s": cfg.max_timeout_s,
        "pool_size": cfg.pool_size,
        "readable": list(cfg.readable_paths),
    }


def _environment() -> dict[str, str]:
    """The server's environment: the allow-listed variables of the caller's, and FIXED_ENV."""
    env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(FIXED_ENV)
    return env


def start_server(
    cfg: SandboxConfig,
) -> tuple[subprocess.Popen, socket.socket, dict[str, bool], list[str]]:
    """Start the server and wait until it is ready. Returns the process this started (the
    server, or the `unshare` that runs it), the control channel, which protections hold, and
    the host paths the code sees in its minimal root (none without one).
    Raises SandboxError if the server does not report ready within `cfg.start_timeout_s`."""
    root = os.geteuid() == 0
    prefix, namespaces = _isolation(cfg, root)
    settings = _settings(cfg, namespaces, root)
    mine, theirs = socket.socketpair()
    cmd = [
        *prefix,
        sys.executable,
        "-I",
        "-c",
        SERVER_BOOTSTRAP,
        str(theirs.fileno()),
        json.dumps(settings),
    ]
    try:
        proc = subprocess.Popen(
            cmd,
            pass_fds=[theirs.fileno()],
            env=_environment(),
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
    finally:
        theirs.close()
    try:
        ready, _, _ = recv(mine, ServerReady, timeout_s=cfg.start_timeout_s)
    except ProtocolError as exc:
        proc.kill()
        proc.wait()
        mine.close()
        shown = [*cmd[:-4], "-c", f"<SERVER_BOOTSTRAP of {os.path.dirname(__file__)}>", cmd[-2]]
        raise SandboxError(
            f"the sandbox server did not start ({exc}); its error output is "
            f"above. Command: {' '.join(shown)} ..."
        ) from exc
    uid = ready.separate_uid
    protections = {
        "network_isolated": namespaces,
        "pid_namespace": namespaces,
        "separate_uid": uid,
        "process_cap": uid,
        "daemon_cleanup": namespaces or uid,
        "resource_limits": True,
        "clean_environment": True,
        "no_new_privileges": True,
        **{name: bool(on) for name, on in ready.protections.items()},
    }
    return proc, mine, protections, ready.shown


def stop_server(proc: subprocess.Popen, control: socket.socket) -> None:
    """Close the control channel, on which the server exits; kill it if it has not within 5 s."""
    control.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
