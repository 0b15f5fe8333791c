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

Threat model. The code is assumed hostile: written by a model under training, which may loop,
allocate, fork, print, crash or poke at its surroundings, by accident or because reward hacking
found it useful, and which may read this package's source (it is importable from inside as
`sandbox`) and speak its protocol. What holds, each property with a test in
tests/envs/test_sandbox.py or, for hostile code aimed at the isolation and the protocol,
tests/envs/test_sandbox_hostile.py:
  * time: a wall-clock limit per call (SIGKILL, so ignoring signals does not help) and a CPU-time
    limit per process;
  * memory: a hard address-space limit (RLIMIT_AS; the code cannot raise it), reported as
    "memory"; and, where the machine lets the server create cgroups, a memory cgroup per session
    limited to `memory_mb`, which also counts what no address space holds (memfd, shared memory,
    tmpfs files); an OOM kill in it is reported as "memory";
  * processes and threads: a cap per session (RLIMIT_NPROC on a uid of the session's own);
  * output: stdout and stderr are capped, keeping head and tail with a marker; invalid UTF-8 is
    replaced; the result travels on a channel of its own, so output cannot forge it;
  * a call cannot change what later calls run in: a stateless call forks from a pristine state of
    another uid (root), which it cannot signal, renice, re-limit, re-pin or trace; its scratch
    directory and /dev/shm are fresh tmpfs mounts for the next call (no file or extended attribute
    survives, and a tree of any depth costs the cleanup nothing), and the System V IPC objects
    and POSIX message queues it made are removed;
  * sessions and the host share no kernel object: each session has its own mount, IPC and
    network namespaces (SysV IPC, POSIX message queues, abstract UNIX sockets), its own /dev/shm
    and scratch tmpfs, each sized `scratch_mb`; the keyring system calls fail (seccomp), so
    neither the caller's session keyring nor any key made by a call is reachable, and the server
    and each session join a fresh, empty session keyring;
  * files: a per-file size cap; code writes only in its session's scratch directory (cwd, HOME,
    TMPDIR) and /dev/shm; within a kept session, files are not rolled back with a failed cell's
    variables (SandboxSession.run). The code's root is a minimal one (root.py), built by the
    server and copied into each session's mount namespace: read-only, it shows the system's
    /usr (and the links into it), the interpreter's prefixes, the packages the server imported,
    this package and `SandboxConfig.readable_paths`, each through an overlay, so that no lock the
    code takes is on a host file and no UNIX socket file of the host answers it; plus a /dev of
    six devices, its /proc, empty /tmp and /var/tmp (unwritable), and an /etc of two copies
    (ld.so.cache, localtime). Nothing else of the host is there: no home, project, /run, host
    /tmp or /etc, and no /sys (where sessions have memory cgroups, the server's /sys is a
    directory only root may enter, so no cgroup counter, of another session or of an earlier
    call, is readable). `PythonSandbox.visible_paths` lists the host paths shown;
  * network: a network namespace with no interfaces up (not even loopback to the host);
  * secrets: the environment holds only allow-listed variables; no file descriptor is inherited;
    the caller's processes are invisible (own pid namespace and /proc) and not readable (other uid);
    each session's /proc is its own pid namespace's: it shows the session's processes only, none
    of another session's or the server's; /dev/pts is a devpts instance of the session's own, so a
    pty one session opens is not in another's;
  * the supervisor believes nothing the code's processes say without checking it: every read
    from a state or cell has a size limit and a deadline for the whole message (a report
    dribbled a byte at a time ends at the call's timeout); a cell's announcement is checked
    against the kernel (a pidfd of a child of the state, read ends of pipes); a claimed promotion
    holds only if, the old state killed and the cell stopped, no other process of the code is
    alive; a state's rollback reply is checked the same way, and a state that did not roll back
    is replaced; a kept state is stopped (SIGSTOP) between calls, so threads the code left in it
    do not run while the caller is away;
  * leftovers: every process the code started, double-forked setsid daemons included, is gone when
    the call returns (a scoped kill(-1) inside the session's pid namespace or uid);
  * the caller: hostile code cannot kill the supervisor (pid 1 of its namespace, another uid) or the
    caller; a crash of the code is a result ("crashed"), never an exception in the caller. The
    caller's own mistakes are refused in its process before anything is sent, and the session
    goes on: code that is not a str or is larger than a message (TypeError, ValueError), a
    `timeout_s` that is not a finite number of seconds in range (TypeError, ValueError), a closed
    session or sandbox (RuntimeError: a closed sandbox never starts a new server). SandboxError
    is never the code's or the caller's fault. `SandboxSession.close()` returns once the session's
    processes are gone (5 s at most), `PythonSandbox.close()` once its server is (5 s, then it is
    killed).
Not covered: kernel exploits and side channels (use a VM or gVisor for adversaries of that class);
reading the world-readable files of the paths a minimal root shows (and, where the machine allows no
minimal root, of the whole host: the code then sees what an unprivileged user sees);
CPU and memory bandwidth shared with the caller; forged results of a call by the code itself (it can
only lie about its own result). Within a session that keeps state, the state is the code's own
process, of the session's uid: a cell cannot trace it or read or write its memory (a kept state is
undumpable), and a discarded cell cannot leave it changed: the supervisor puts the state's nice
value, affinity and scheduling policy back as they were before the cell ran, and a state whose
limits changed or that was killed is replaced, with a note. The OOM killer of a session's memory
cgroup takes the cell that went over, never the state it forked from: the supervisor gives every
cell the highest OOM score adjustment (1000) and every state the default (0). A cell that succeeds
kills nothing before it has blocked every signal, set the code's hooks aside (its Python signal
handlers, trace and profile functions, and what it left in sys.stdout and sys.stderr, which is
held and never finalized; the next cell puts them back) and checked that its channel to the
supervisor is intact; one whose channel was closed or replaced is rolled back. A state held up by
anything else the code left in it costs the next call at most that call's timeout, then the
session is reset; every reset is noted at the end of the call's stderr, whatever its status. A later cell of that session can resume
a stopped state's threads, and a cell can signal or renice its state while it runs; that changes
only what the same session's code could change in a successful cell, and no other session or
stateless call. While a stopped state forks the next cell, its threads run for that moment
(milliseconds). Which protections hold depends on the machine: full containment needs root or user
namespaces plus util-linux `unshare`; the pristine state of another uid, the per-session cgroup and
the keyring filter need root (or a writable cgroup) and a known CPU architecture (x86-64 or arm64),
as does the minimal root (pivot_root), whose overlays need a kernel that allows them (in a user
namespace, Linux 5.11 or later; elsewhere the paths are bound read-only and `host_locks_private`
is off); `PythonSandbox.protections` lists them, and the first sandbox of a process warns once, naming the
ones that are off.

Modules, one concern each. The caller imports only client.py, config.py, launch.py, protocol.py
and framing.py; the server imports every module but the first three (and not this file:
server.py's docstring says how it imports them).
  client.py      PythonSandbox, SandboxSession, ExecutionResult, shared_sandbox: the caller's
                 side, which talks to the server and to each session's supervisor
  config.py      SandboxConfig, DEFAULT_PRELOAD, SandboxError
  launch.py      starting the server (unshare, its environment, its readiness) and stopping it
  protocol.py    the typed messages both sides exchange, on framing.py
  framing.py     a message on a socket: header, payload and descriptors, size limits, deadlines
  server.py      the server process: private filesystem, preloads, session pool; the entry point
  supervisor.py  P, one session's supervisor: a call from order to reply, keeping or discarding
  hold.py        P's hold on its state S (S's phases and the moves between them) and on the
                 next call's cell: forking and checking it, rollback, ending every process
  checks.py      what P checks against the kernel before it believes a cell or a state
  output.py      a cell's output as P keeps it: head and tail, the rest counted
  jail.py        a session's own namespaces, filesystems and memory cgroup
  root.py        the minimal root the server builds and moves into, which every session copies
  state.py       S, the state process: privileges dropped, limits set; forks each call's cell
  cell.py        C, the cell process: runs one snippet, and may become the new state
  linux.py       namespaces, mounts, prctl, the keyring filter, IPC cleanup, rlimits
  processes.py   lean fork, scoped kill, reaping, pidfds, scheduling, /proc readers
  cgroups.py     the memory cgroup of each session: its limit and its OOM kills
The package imports nothing outside the standard library at module level, and nothing else of
this project.
"""

from .client import ExecutionResult, PythonSandbox, SandboxSession, Status, shared_sandbox
from .config import DEFAULT_PRELOAD, SandboxConfig, SandboxError
from .launch import ENV_ALLOWLIST, FIXED_ENV

__all__ = [
    "DEFAULT_PRELOAD",
    "ENV_ALLOWLIST",
    "FIXED_ENV",
    "ExecutionResult",
    "PythonSandbox",
    "SandboxConfig",
    "SandboxError",
    "SandboxSession",
    "Status",
    "shared_sandbox",
]
