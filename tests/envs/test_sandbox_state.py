"""A kept state survives the cells that fork from it: a cell that takes its session over the memory
cgroup is the one the OOM killer picks, never the state."""

import pytest
from sandboxes import need

from toolgrpo.envs.sandbox import PythonSandbox, SandboxConfig

TIGHT = SandboxConfig(timeout_s=10.0, max_timeout_s=20.0, memory_mb=256, scratch_mb=8)


@pytest.fixture(scope="module")
def tight():
    with PythonSandbox(TIGHT) as sb:
        yield sb


def test_a_cell_over_the_memory_cgroup_is_the_oom_victim_not_the_state(tight):
    """The state holds 96 MiB of its own; the cell lets go of its copy (so its resident set is
    smaller than the state's) and fills memfd pages, which are in no process's resident set,
    until the cgroup's 256 MiB are gone: by size alone the OOM killer would pick the state."""
    need(tight, "memory_cgroup")
    with tight.session() as s:
        assert s.run("keep = bytearray(96 << 20)\nkeep[::4096] = b'x' * len(keep[::4096])").ok
        r = s.run(
            "import os\ndel keep\nchunk = bytes(1 << 20)\nfds = []\nfor _ in range(8):\n"
            "    fds.append(os.memfd_create('hoard'))\n"
            "    for _ in range(32):\n"
            "        os.write(fds[-1], chunk)\nprint('held', len(fds))"
        )
        assert r.status == "memory" and "held" not in r.stdout, r
        after = s.run("print(len(keep) >> 20, keep[4096:4097])")
        assert after.stdout == "96 bytearray(b'x')\n", after  # the same state, not a new one
        assert "sandbox" not in after.stderr, after  # no note of a replaced state


VISIBLE_UIDS = """
import os
uids = set()
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        status = open(f'/proc/{pid}/status').read()
    except OSError:
        continue
    uids.add(int(status.split('Uid:')[1].split()[0]))
print(sorted(uids - {os.getuid(), 0}))
"""


def test_a_session_sees_no_process_of_another_session(tight):
    """Session A's state runs as A's uid; session B's /proc shows no process of a uid but its
    own and root's (its supervisor)."""
    need(tight, "session_proc", "separate_uid")
    with tight.session() as a, tight.session() as b:
        assert a.run("x = 1").ok and b.run("y = 2").ok
        seen = b.run(VISIBLE_UIDS)
        assert seen.stdout == "[]\n", seen


def test_a_pty_of_one_session_is_not_in_another(tight):
    """Session A holds a pty open; session B's /dev/pts is a devpts of its own, without it."""
    need(tight, "session_ptys")
    with tight.session() as a, tight.session() as b:
        opened = a.run("import os\nmaster, slave = os.openpty()\nprint(os.ttyname(slave))")
        assert opened.ok and opened.stdout.startswith("/dev/pts/"), opened
        name = opened.stdout.strip()
        seen = b.run(
            "import os\nprint(sorted(os.listdir('/dev/pts')))\n"
            f"try:\n    os.open({name!r}, os.O_RDWR | os.O_NOCTTY)\n    print('opened')\n"
            "except OSError as e:\n"
            "    print(type(e).__name__)"
        )
        assert seen.stdout == "['ptmx']\nFileNotFoundError\n", seen
        again = b.run("import os\nmaster, slave = os.openpty()\nprint(os.ttyname(slave))")
        assert again.ok and again.stdout.startswith("/dev/pts/"), again  # its own ptys work
