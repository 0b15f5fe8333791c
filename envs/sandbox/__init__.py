"""PythonSandbox: run untrusted, model-written Python fast and contained.

    sandbox = PythonSandbox()
    sandbox.run("print(2**100 % 997)").stdout          # stateless: a fresh session per call
    with sandbox.session() as s:                        # notebook cells: state survives calls
        s.run("import sympy as sp; x = sp.Symbol('x')")
        s.run("print(sp.solve(x**2 - 4, x))")

How it is fast: one server interpreter is started per sandbox with math, numpy, sympy, fractions,
itertools and functools already imported (and sympy's caches warm); every session and every call is
a `fork` of it, so no call pays for interpreter start-up or imports. Ready sessions wait in a pool.
A session's state lives in a process of its own; each call runs in a fork of that state, which
becomes the new state if the call succeeds and is thrown away (previous state intact) if it fails,
times out or crashes. That fork is made, warmed up and announced while the session waits for its
next call, so a call pays for neither the fork nor its page faults when calls are spaced out, as a
rollout's are. server.py draws the process tree; docs/sandbox.md says where a call's time goes.

Threat model. The code is assumed hostile but ordinary: written by a model under training, which may
loop, allocate, fork, print, crash or poke at its surroundings, by accident or because reward
hacking found it useful. Covered, each with a test in tests/envs/test_sandbox.py:
  * time: a wall-clock limit per call (SIGKILL, so ignoring signals does not help) and a CPU-time
    limit per process;
  * memory: a hard address-space limit (RLIMIT_AS; the code cannot raise it), reported as "memory";
  * processes and threads: a cap per session (RLIMIT_NPROC on a uid of the session's own);
  * output: stdout and stderr are capped, keeping head and tail with a marker; invalid UTF-8 is
    replaced; the result travels on a channel of its own, so output cannot forge it;
  * files: a per-file size cap; code writes only in a fresh scratch directory of its own (cwd,
    HOME, TMPDIR), emptied after a stateless call and removed with its session; /tmp and /var/tmp
    are private and unwritable, /dev/shm private and emptied of a session's files; directories
    closed to other users (such as /root, with its tokens and caches) are hidden, only the
    interpreter is shown there;
  * network: a network namespace with no interfaces up (not even loopback to the host);
  * secrets: the environment holds only allow-listed variables; no file descriptor is inherited;
    the caller's processes are invisible (own pid namespace and /proc) and not readable (other uid);
  * leftovers: every process the code started, double-forked setsid daemons included, is gone when
    the call returns (a scoped kill(-1) inside the session's pid namespace or uid);
  * the caller: hostile code cannot kill the supervisor (pid 1 of its namespace, another uid) or the
    caller; a crash of the code is a result ("crashed"), never an exception in the caller.
Not covered: kernel exploits and side channels (use a VM or gVisor for adversaries of that class);
reading world-readable files (the code runs as an unprivileged user and sees what such a user
sees); CPU and memory bandwidth shared with the caller; forged results of a call by the code itself
(it can only lie about its own result). Which protections hold depends on the machine: full
containment needs root or user namespaces plus util-linux `unshare`; `PythonSandbox.protections`
lists them, and the first sandbox of a process warns once, naming the ones that are off.

Modules, one concern each. The caller imports only client.py and protocol.py; the server imports
every module but client.py (and not this file: server.py's docstring says how it imports them).
  client.py      PythonSandbox, SandboxSession, SandboxConfig, ExecutionResult, SandboxError,
                 shared_sandbox: the caller's side, which starts the server and talks to it
  protocol.py    framing with size limits, and the typed messages both sides exchange
  server.py      the server process: private filesystem, preloads, session pool; the entry point
  supervisor.py  P, one session's supervisor: a call from order to reply, keeping or discarding
  state.py       S, the state process: privileges dropped, limits set; forks each call's cell
  cell.py        C, the cell process: runs one snippet, and may become the new state
  linux.py       namespaces, mounts, prctl, rlimits, lean fork, pidfds, scoped kill, /proc readers
The package imports nothing outside the standard library at module level, and nothing else of
this project.
"""

from .client import (DEFAULT_PRELOAD, ENV_ALLOWLIST, FIXED_ENV, ExecutionResult, PythonSandbox,
                     SandboxConfig, SandboxError, SandboxSession, Status, shared_sandbox)

__all__ = ["DEFAULT_PRELOAD", "ENV_ALLOWLIST", "FIXED_ENV", "ExecutionResult", "PythonSandbox",
           "SandboxConfig", "SandboxError", "SandboxSession", "Status", "shared_sandbox"]
