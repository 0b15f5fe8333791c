"""Hostile code against the sandbox's isolation and protocol: one test per property of the threat
model's four classes (envs/sandbox/__init__.py), each named after what it shows.

1. A call cannot change what later calls run in.
2. Sessions and the host share no kernel object.
3. The supervisor believes nothing the cell or state says without checking it.
4. Memory outside the address space (memfd, shared memory) counts against the limit.

Every attack is bounded so that it stays harmless if containment failed: sleeps and loops end by
themselves within seconds, memory stays under 400 MiB, and nothing signals a process the test
did not start.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import time
import uuid

import pytest
from sandboxes import need, still_serves

from toolgrpo.envs.sandbox import PythonSandbox, SandboxConfig

HOSTILE = SandboxConfig(timeout_s=5.0, max_timeout_s=20.0, memory_mb=256, scratch_mb=8)


@pytest.fixture(scope="module")
def sandbox():
    with PythonSandbox(HOSTILE) as sb:
        yield sb


def random_key() -> int:
    """A System V IPC key no other run uses (a leak of a failed run cannot collide with it)."""
    return int.from_bytes(os.urandom(3), "big") | 0x10000000


# The cell's channel to its supervisor, and the protocol's modules, as hostile code finds them.
FIND_CHANNEL = """
import os, socket, stat, sys, time
from sandbox import framing, protocol
chan = next(socket.socket(fileno=os.dup(fd)) for fd in range(3, 64)
            if os.path.exists(f"/proc/self/fd/{fd}") and stat.S_ISSOCK(os.fstat(fd).st_mode))
"""


# --- 1. a call cannot change what later calls run in ----------------------------------------------
def test_a_stateless_cell_cannot_signal_renice_relimit_or_trace_the_state_it_forks_from(sandbox):
    need(sandbox, "state_untouchable")
    r = sandbox.run("""
import ctypes, os, resource, signal
state, denied = os.getppid(), []
def attempt(name, fn):
    try:
        fn()
    except PermissionError:
        denied.append(name)
def stop_and_go():
    os.kill(state, signal.SIGSTOP)
    os.kill(state, signal.SIGCONT)  # harmless if the stop got through
attempt("signal", stop_and_go)
attempt("renice", lambda: os.setpriority(os.PRIO_PROCESS, state, 19))
attempt("relimit", lambda: resource.prlimit(state, resource.RLIMIT_NOFILE, (16, 16)))
attempt("affinity", lambda: os.sched_setaffinity(state, {0}))
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(16, state, None, None) == 0:  # PTRACE_ATTACH; detach if it got through
    libc.ptrace(17, state, None, None)
else:
    denied.append("ptrace")
print(sorted(denied))
""")
    assert r.stdout == "['affinity', 'ptrace', 'relimit', 'renice', 'signal']\n", r
    r = sandbox.run(
        "import os, resource\n"
        "print(os.getpriority(os.PRIO_PROCESS, 0), "
        "resource.getrlimit(resource.RLIMIT_NOFILE)[1], "
        "len(os.sched_getaffinity(0)) == os.cpu_count())"
    )
    assert r.stdout == f"0 {HOSTILE.max_open_files} True\n", r


def test_a_stateless_call_leaves_no_file_attribute_or_ipc_object_to_the_next(sandbox):
    """A 1,000-deep tree costs the cleanup nothing (a fresh filesystem per call, not a walk);
    extended attributes and System V objects do not outlive the call either."""
    need(sandbox, "scratch_per_call", "session_ipc")
    key = random_key()
    r = sandbox.run(f"""
import ctypes, os
os.setxattr(".", "user.mark", b"1")
open("/dev/shm/left", "w").write("x")
for _ in range(1000):
    os.mkdir("d")
    os.chdir("d")
libc = ctypes.CDLL(None)
print(libc.shmget({key}, 4096, 0o1600) >= 0, libc.msgget({key}, 0o1600) >= 0)
""")
    assert r.stdout == "True True\n", r
    for _ in range(2):  # whichever idle session the next call lands on
        r = sandbox.run(f"""
import ctypes, os
libc = ctypes.CDLL(None)
print(os.listdir("."), os.listxattr("."), os.listdir("/dev/shm"),
      libc.shmget({key}, 0, 0), libc.msgget({key}, 0))
""")
        assert r.stdout == "[] [] [] -1 -1\n", r


def test_a_discarded_cell_of_a_session_cannot_trace_or_write_the_state_it_rolls_back_to(sandbox):
    """A kept state has its session's uid, like its cells, but is undumpable: a cell can neither
    ptrace it nor open its memory, so a cell that fails cannot have changed the state that the
    session rolls back to. (Signals, nice values and limits follow the uid: docs/sandbox.md.)"""
    with sandbox.session() as s:
        assert s.run("marker = 'intact'").status == "ok"
        r = s.run("""
import ctypes, os
state, denied = os.getppid(), []
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(16, state, None, None) == 0:  # PTRACE_ATTACH; detach if it got through
    libc.ptrace(17, state, None, None)
else:
    denied.append("ptrace")
try:
    with open(f"/proc/{state}/mem", "r+b") as mem:  # would let it rewrite `marker`
        pass
except PermissionError:
    denied.append("mem")
print(sorted(denied))
raise SystemExit(1)
""")
        assert (r.status, r.stdout) == ("error", "['mem', 'ptrace']\n"), r
        assert s.run("print(marker)").stdout == "intact\n"


def test_a_discarded_cell_of_a_session_leaves_its_state_as_it_found_it(sandbox):
    """A cell of a kept state's uid can renice, re-pin, re-schedule and re-limit its state. When
    the cell is discarded, the supervisor puts the state's scheduling back as it read it before
    the cell ran; a state whose limits changed (hard ones go up only with CAP_SYS_RESOURCE) is
    replaced, with a note (in the next call's result, since that rollback runs after the
    reply). Either way the next cell starts as the failed one did."""
    probe = (
        "import os, resource\n"
        "print(os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0)), "
        "os.sched_getscheduler(0), resource.getrlimit(resource.RLIMIT_NOFILE), marker)"
    )
    reschedule = """
import os
state = os.getppid()
os.setpriority(os.PRIO_PROCESS, state, 19)
os.sched_setaffinity(state, {min(os.sched_getaffinity(0))})
os.sched_setscheduler(state, os.SCHED_IDLE, os.sched_param(0))
print(os.getpriority(os.PRIO_PROCESS, state), os.sched_getscheduler(state))
raise RuntimeError("discard me")
"""
    relimit = """
import os, resource
resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (16, 16))
raise RuntimeError("discard me")
"""
    with sandbox.session() as s:
        assert s.run("marker = 'kept'").status == "ok"
        before = s.run(probe)
        assert before.status == "ok" and before.stdout.endswith(" kept\n"), before
        r = s.run(reschedule)
        assert (r.status, r.stdout) == ("error", f"19 {os.SCHED_IDLE}\n"), r
        assert s.run(probe).stdout == before.stdout  # put back, the state kept
        assert s.run(relimit).status == "error"
        r = s.run(probe)  # a fresh state: `marker` is gone, the limits are the pristine ones
        assert r.status == "error" and "NameError" in r.stderr, r
        assert "changed its state's scheduling or limits" in r.stderr, r  # noted after the reply
        assert s.run("marker = 'kept'").status == "ok"
        assert s.run(probe).stdout == before.stdout


# --- 2. sessions and the host share no kernel object ----------------------------------------------
def test_sessions_have_their_own_ipc_namespace(sandbox):
    need(sandbox, "session_ipc")
    key = random_key()
    name = f"/tg{uuid.uuid4().hex[:8]}"
    make = (
        f"import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"print(libc.shmget({key}, 4096, 0o1666) >= 0, libc.msgget({key}, 0o1666) >= 0,"
        f" libc.mq_open({name!r}.encode(), os.O_CREAT | os.O_RDWR, 0o666, None) >= 0)"
    )
    look = (
        f"import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"print(libc.shmget({key}, 0, 0), libc.msgget({key}, 0),"
        f" libc.mq_open({name!r}.encode(), os.O_RDONLY) < 0 and ctypes.get_errno())"
    )
    with sandbox.session() as a, sandbox.session() as b:
        assert a.run(make).stdout == "True True True\n"
        assert a.run(look).stdout.split()[2] == "False"  # the queue is there for its session...
        assert b.run(look).stdout == f"-1 -1 {errno.ENOENT}\n"  # ...and only there
        libc = ctypes.CDLL(None, use_errno=True)  # nor on the host
        assert libc.shmget(key, 0, 0) == -1 and libc.msgget(key, 0) == -1


def test_sessions_do_not_share_a_network_namespace(sandbox):
    """Abstract UNIX sockets are scoped by network namespace: one session's listener is
    unreachable from another session and from the host."""
    need(sandbox, "session_network")
    address = f"\0toolgrpo-test-{uuid.uuid4().hex}"
    with sandbox.session() as a, sandbox.session() as b:
        assert a.run(
            f"import socket\nlistener = socket.socket(socket.AF_UNIX)\n"
            f"listener.bind({address!r})\nlistener.listen()"
        ).ok
        r = b.run(
            f"import socket\ntry:\n    socket.socket(socket.AF_UNIX).connect({address!r})\n"
            f"    print('connected')\nexcept OSError as exc:\n    print(exc.errno)"
        )
        assert r.stdout == f"{errno.ECONNREFUSED}\n", r
        with socket.socket(socket.AF_UNIX) as s, pytest.raises(ConnectionRefusedError):
            s.connect(address)


def test_sessions_have_their_own_dev_shm(sandbox):
    need(sandbox, "session_shm")
    name = f"/dev/shm/toolgrpo-test-{uuid.uuid4().hex}"
    with sandbox.session() as a, sandbox.session() as b:
        assert a.run(f"open({name!r}, 'w').write('a secret')").ok
        assert a.run(f"print(open({name!r}).read())").stdout == "a secret\n"
        assert b.run(f"import os\nprint(os.path.exists({name!r}))").stdout == "False\n"
    assert not os.path.exists(name)


def test_each_session_has_its_own_scratch_quota(sandbox):
    """One session filling its scratch filesystem leaves another's intact (8 MiB each here)."""
    need(sandbox, "scratch_quota")
    with sandbox.session() as a, sandbox.session() as b:
        r = a.run(
            "try:\n    open('fill', 'wb').write(bytes(12 << 20))\n"
            "except OSError as exc:\n    print(exc.errno)"
        )
        assert r.stdout == f"{errno.ENOSPC}\n", r
        r = b.run("open('small', 'wb').write(bytes(1 << 20))\nprint('written')")
        assert r.stdout == "written\n", r


def test_no_keyring_is_reachable(sandbox):
    """Neither the caller's session keyring nor one of the session's: keyring system calls fail,
    so no key outlives a call either."""
    need(sandbox, "keyrings_denied")
    r = sandbox.run("""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
nr = {"x86_64": (248, 250), "aarch64": (217, 219)}[os.uname().machine]
KEY_SPEC_SESSION_KEYRING, KEYCTL_GET_KEYRING_ID = -3, 0
results = [libc.syscall(nr[1], KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0),
           ctypes.get_errno(),
           libc.syscall(nr[0], b"user", b"planted", b"x", 1, KEY_SPEC_SESSION_KEYRING),
           ctypes.get_errno()]
print(results)
""")
    assert r.stdout == f"[-1, {errno.EPERM}, -1, {errno.EPERM}]\n", r


# --- 3. the supervisor believes nothing unchecked -------------------------------------------------
@pytest.mark.parametrize("frame", ["dribbled", "long_header"])
def test_a_result_frame_cannot_stretch_a_call_past_its_timeout(sandbox, frame):
    """The cell's report is read under the call's deadline: one written a byte every 0.2 s, or
    one announcing a long header, ends the call at its timeout."""
    if frame == "dribbled":
        attack = (
            'head = b\'{"op":"done","status":"ok","promoted":false}\'\n'
            "for byte in framing.PREFIX.pack(len(head), 0) + head:\n"
            "    chan.send(bytes([byte]))\n"
            "    time.sleep(0.2)\n"
        )
    else:
        attack = (
            "chan.send(framing.PREFIX.pack(60000, 0))\n"
            "for _ in range(30):\n"
            "    chan.send(b' ' * 100)\n"
            "    time.sleep(0.2)\n"
        )
    t0 = time.monotonic()
    r = sandbox.run(FIND_CHANNEL + attack, timeout_s=1.0)
    assert r.status == "timeout", r
    # the dribble would take 10 s (the long header 6 s); 10 s only guards against a hang
    assert time.monotonic() - t0 < 10
    still_serves(sandbox)


def test_a_forged_promotion_does_not_keep_a_running_process(sandbox):
    """A cell that says it is the new state while a child of its code keeps running is not kept:
    the call is not ok, and the child is gone when it returns."""
    with sandbox.session() as s:
        r = s.run(
            FIND_CHANNEL
            + """
import os
pid = os.fork()
if pid == 0:  # beats for 3 s at most
    for _ in range(150):
        open("beat", "a").write(".")
        time.sleep(0.02)
    os._exit(0)
time.sleep(0.1)
protocol.send(chan, protocol.CellDone("ok", promoted=True))
time.sleep(0.5)
"""
        )
        assert r.status == "crashed" and "could not be kept" in r.stderr, r
        size = s.run("import os\nprint(os.path.getsize('beat'))").stdout
        time.sleep(0.2)
        assert s.run("print(os.path.getsize('beat'))").stdout == size


def test_a_forged_ready_message_does_not_hang_the_supervisor(sandbox):
    """A kept state whose code announces a cell of its own making (descriptors of /dev/zero, a
    pid it does not have) is replaced, and the session goes on."""
    with sandbox.session() as s:
        assert s.run("""
import os, sys, time
from sandbox import protocol
def forged(chan, *args):
    zero = os.open("/dev/zero", os.O_RDONLY)
    protocol.send(chan, protocol.CellReady(1), fds=[zero, zero, zero])
    time.sleep(30)
    os._exit(0)
sys.modules["sandbox.state"].cell_process = forged
kept = 1
""").ok
        t0 = time.monotonic()
        r = s.run("print(kept)")
        assert time.monotonic() - t0 < 10  # the forger sleeps 30 s: the call waits for none of it
        assert r.status == "error" and "NameError" in r.stderr, r
        assert "announced a cell that is not one" in r.stderr, r
        assert s.run("print(6 * 7)").stdout == "42\n"


def test_a_state_that_does_not_roll_back_is_replaced(sandbox):
    """A kept state whose code skips the rollback's kill replies as if it had killed; the
    supervisor checks, finds the discarded cell's child alive and ends the session's processes
    before the call returns."""
    with sandbox.session() as s:
        assert s.run(
            "import sys\nstate = sys.modules['sandbox.state']\n"
            "state.kill_all_but_self = lambda **kw: None\n"
            "state.alive = lambda pid: False"
        ).ok
        r = s.run("""
import os, time
if os.fork() == 0:  # beats for 3 s at most
    for _ in range(150):
        open("beat", "a").write(".")
        time.sleep(0.02)
    os._exit(0)
time.sleep(0.1)
raise RuntimeError("discard me")
""")
        assert r.status == "error" and "did not roll back; state was reset" in r.stderr, r
        size = s.run("import os\nprint(os.path.getsize('beat'))").stdout
        time.sleep(0.2)
        assert s.run("print(os.path.getsize('beat'))").stdout == size


def test_threads_of_a_kept_state_do_not_run_between_calls(sandbox):
    with sandbox.session() as s:
        assert s.run("""
import threading, time
def beat():  # 5 s at most
    for _ in range(500):
        open("beat", "w").write(str(time.monotonic()))
        time.sleep(0.01)
threading.Thread(target=beat, daemon=True).start()
time.sleep(0.05)
""").ok
        time.sleep(0.5)
        r = s.run("print(time.monotonic() - float(open('beat').read()))")
        assert float(r.stdout) > 0.4, r


# --- 4. memory outside the address space counts --------------------------------------------------
def test_memfd_pages_count_against_the_memory_limit(sandbox):
    """memfd pages are in no address space (RLIMIT_AS does not see them); the session's memory
    cgroup does: 6 x 64 MiB with memory_mb=256 ends in "memory"."""
    need(sandbox, "memory_cgroup")
    r = sandbox.run(
        "import os\nfds = []\nfor _ in range(6):\n"
        "    fds.append(os.memfd_create('hoard'))\n"
        "    os.write(fds[-1], bytes(64 << 20))\nprint('held', len(fds))"
    )
    assert r.status == "memory" and "held" not in r.stdout, r
    still_serves(sandbox)
