"""The sandbox's wire protocol (envs/sandbox/protocol.py, on framing.py) on socket pairs: no server,
no fork.

Every message kind survives a round trip; a reader rejects, with ProtocolError, whatever exceeds
the bounds (header, payload, descriptors), a frame cut short, a silent peer past a deadline, a
header that is not a JSON object, and a message of a kind it does not expect, closing any
descriptors that came with it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from toolgrpo.envs.sandbox import framing
from toolgrpo.envs.sandbox import protocol as p

SAMPLES = [  # one of each kind, with the descriptors it carries
    p.ServerReady(
        pid=12,
        protections={"private_tmp": True, "hidden_home": False},
        separate_uid=True,
        shown=["/usr", "/opt/venv"],
    ),
    p.Open(),
    p.Attach(),
    p.Run(timeout_s=2.5, keep=False),
    p.Result(status="error", wall_s=0.25, truncated=True, exit_code=-9, stdout_len=3, cell=4),
    p.Fork(),
    p.Fork(reap=True),
    p.Fork(reap=False, warm=False),
    p.ForkFailed(error="its process limit is reached"),
    p.CellReady(proc_pid=4242),
    p.RunCell(cell=7, cpu_s=11, keep=True, promote_by=1234.5),
    p.CellDone(status="memory"),
    p.CellDone(status="ok", promoted=True),
    p.Promote(),
    p.Promoted(),
    p.Rollback(),
    p.RolledBack(wait_status=9),
    p.RolledBack(wait_status=None),
]


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def send_raw(
    sock: socket.socket, head: bytes, payload: bytes = b"", head_len=None, payload_len=None
) -> None:
    """A frame as bytes, with lengths that may lie."""
    sock.sendall(
        framing.PREFIX.pack(
            len(head) if head_len is None else head_len,
            len(payload) if payload_len is None else payload_len,
        )
        + head
        + payload
    )


def test_every_kind_of_message_has_a_sample():
    kinds = {
        obj
        for obj in vars(p).values()
        if isinstance(obj, type) and issubclass(obj, p.Message) and obj is not p.Message
    }
    assert kinds == {type(m) for m in SAMPLES}


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: f"{type(m).__name__}")
def test_round_trip_of_each_message(pair, message):
    a, b = pair
    payload = b"print('\xc3\xa9')\n" if message.max_payload else b""
    pipes = [os.pipe() for _ in range(message.fds)]
    sent = [r for r, _ in pipes]
    p.send(a, message, payload, fds=sent)
    got, got_payload, fds = p.recv(b, type(message))
    try:
        assert got == message and type(got) is type(message)
        assert got_payload == payload and len(fds) == message.fds
        for fd, (r, w) in zip(fds, pipes):  # each descriptor is a new one for the same pipe
            assert fd not in sent and os.fstat(fd).st_ino == os.fstat(r).st_ino
            os.write(w, b"x")
            assert os.read(fd, 1) == b"x"
        header = message.header()
        assert header["op"] == message.op and set(header) == {"op", *message.names}
        assert json.loads(json.dumps(header)) == header  # JSON as it is
    finally:
        for fd in fds + [fd for pipe in pipes for fd in pipe]:
            os.close(fd)


def test_a_receiver_takes_any_of_the_kinds_it_names(pair):
    a, b = pair
    p.send(a, p.ForkFailed("no"))
    p.send(a, p.CellReady(None), fds=[a.fileno(), a.fileno(), a.fileno()])
    first, _, fds = p.recv(b, p.CellReady, p.ForkFailed)
    assert first == p.ForkFailed("no") and fds == []
    second, _, fds = p.recv(b, p.CellReady, p.ForkFailed)
    assert second == p.CellReady(None) and len(fds) == 3
    for fd in fds:
        os.close(fd)


def test_messages_compare_by_kind_and_fields():
    assert p.Run(1.0, True) == p.Run(1.0, True) != p.Run(1.0, False)
    assert p.Fork() == p.Fork() != p.Rollback()
    assert p.Run(1.0, True) != p.RunCell(1, 1, True, 1.0)
    assert repr(p.CellDone("ok")) == "CellDone(status='ok', promoted=False)"


def test_a_message_of_another_kind_is_rejected_and_its_descriptors_closed(pair):
    a, b = pair
    p.send(a, p.Rollback())
    with pytest.raises(p.BadMessage, match="expected 'fork', got 'rollback'"):
        p.recv(b, p.Fork)
    before = open_fds()
    p.send(a, p.Attach(), fds=[a.fileno()])
    with pytest.raises(p.BadMessage):
        p.recv(b, p.Open)  # also one descriptor: it arrives, and is closed
    assert open_fds() == before
    framing.send_msg(a, {"no": "op"})
    with pytest.raises(p.BadMessage, match="got None"):
        p.recv(b, p.Promote)
    p.send(a, p.Promote())  # the stream is still in step
    assert p.recv(b, p.Promote)[0] == p.Promote()


@pytest.mark.parametrize(
    "header",
    [
        {"op": "run"},  # a field missing
        {"op": "run", "timeout_s": "soon"},  # not a number
        {
            "op": "result",
            "status": "ok",
            "wall_s": 0,
            "truncated": False,
            "stdout_len": None,
            "cell": 1,
        },
        {"op": "ready", "pid": 1, "protections": 3},
    ],
)
def test_malformed_fields_are_a_bad_message(pair, header):
    a, b = pair
    framing.send_msg(a, header)
    with pytest.raises(p.BadMessage, match="malformed"):
        p.recv(b, p.Run, p.Result, p.ServerReady)


def test_fields_are_read_as_the_peer_code_has_always_read_them():
    assert p.decode({"op": "run", "timeout_s": 3}, [p.Run]) == p.Run(3.0, True)  # keep defaults on
    assert p.decode({"op": "ready", "proc_pid": "7"}, [p.CellReady]) == p.CellReady(None)
    # a cell's report comes from the process that ran the code: an unknown status is a crash
    assert p.decode({"op": "done", "status": "fine", "promoted": 1}, [p.CellDone]) == p.CellDone(
        "crashed", False
    )
    done = p.decode({"op": "done", "status": "ok", "promoted": True}, [p.CellDone])
    assert isinstance(done, p.CellDone) and done.promoted


# -- bounds ----------------------------------------------------------------------------------------
def test_a_header_over_the_limit_is_rejected_before_it_is_read(pair):
    a, b = pair
    send_raw(a, b"", head_len=p.MAX_HEADER + 1)  # the lengths alone decide
    with pytest.raises(p.ProtocolError, match="too large"):
        framing.recv_msg(b)
    c, d = socket.socketpair()
    with c, d:
        framing.send_msg(c, {"op": "promote", "pad": "x" * p.MAX_HEADER})
        with pytest.raises(p.ProtocolError, match="too large"):
            p.recv(d, p.Promote)


def test_a_payload_over_the_kind_s_limit_is_rejected(pair):
    a, b = pair
    p.send(a, p.Promote(), b"x")  # Promote carries no payload
    with pytest.raises(p.ProtocolError, match="too large"):
        p.recv(b, p.Promote)
    send_raw(a, b'{"op":"run","timeout_s":1,"keep":true}', payload_len=p.MAX_PAYLOAD + 1)
    with pytest.raises(p.ProtocolError, match="too large"):
        p.recv(b, p.Run)  # rejected from its prefix, without reading 64 MiB
    c, d = socket.socketpair()
    with c, d:
        framing.send_msg(c, {"op": "x"}, b"12345")
        with pytest.raises(p.ProtocolError, match="too large"):
            framing.recv_msg(d, max_payload=4)


@pytest.mark.parametrize(
    "message, sent", [(p.Fork(), 2), (p.CellReady(1), 4), (p.Open(), 3)], ids=lambda x: str(x)
)
def test_more_descriptors_than_the_kind_carries_are_rejected(pair, message, sent):
    a, b = pair
    r, w = os.pipe()
    try:
        before = open_fds()
        p.send(a, message, fds=[r] * sent)
        with pytest.raises(p.ProtocolError, match="file descriptors"):
            p.recv(b, type(message))
        assert open_fds() == before  # what did arrive is closed
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("message", [p.Rollback(), p.CellDone("ok"), p.Promoted()])
def test_a_reader_of_a_kind_without_descriptors_never_gets_any(pair, message):
    """It reads plainly (no ancillary data): the kernel closes whatever was sent along."""
    a, b = pair
    r, w = os.pipe()
    try:
        before = open_fds()
        p.send(a, message, fds=[r, r])
        got, _, fds = p.recv(b, type(message))
        assert got == message and fds == [] and open_fds() == before
    finally:
        os.close(r)
        os.close(w)


def test_recv_msg_default_bounds(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        framing.send_msg(a, {"op": "x"}, fds=[r] * framing.MAX_FDS)
        _, _, fds = framing.recv_msg(b)
        assert len(fds) == framing.MAX_FDS
        for fd in fds:
            os.close(fd)
        framing.send_msg(a, {"op": "x"}, fds=[r] * (framing.MAX_FDS + 1))
        with pytest.raises(p.ProtocolError, match="file descriptors"):
            framing.recv_msg(b)
    finally:
        os.close(r)
        os.close(w)


# -- broken frames and deadlines -------------------------------------------------------------------
@pytest.mark.parametrize(
    "cut", ["nothing", "half_prefix", "prefix_only", "half_header", "half_payload"]
)
def test_a_frame_cut_short_is_a_protocol_error(pair, cut):
    a, b = pair
    head, payload = b'{"op":"run","timeout_s":1,"keep":true}', b"print(1)"
    frame = framing.PREFIX.pack(len(head), len(payload)) + head + payload
    keep = {
        "nothing": 0,
        "half_prefix": 4,
        "prefix_only": 8,
        "half_header": 8 + len(head) // 2,
        "half_payload": 8 + len(head) + 4,
    }[cut]
    a.sendall(frame[:keep])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(p.ProtocolError, match="closed the connection"):
        p.recv(b, p.Run)


@pytest.mark.parametrize("head", [b"[1, 2]", b"not json", b"\xff\xfe", b'"op"'])
def test_a_header_that_is_not_a_json_object_is_rejected(pair, head):
    a, b = pair
    send_raw(a, head)
    with pytest.raises(p.ProtocolError):
        framing.recv_msg(b)


def test_a_read_deadline_bounds_a_silent_peer(pair):
    a, b = pair
    t0 = time.monotonic()
    with pytest.raises(p.ProtocolError):
        p.recv(b, p.Result, timeout_s=0.2)
    assert 0.15 < time.monotonic() - t0 < 2.0  # it waited for the deadline; 2 s (10x): no hang
    assert b.gettimeout() == 0.2  # the socket keeps its deadline (recv_msg_within)
    a.sendall(framing.PREFIX.pack(2, 0))  # a prefix, then silence mid-message
    with pytest.raises(p.ProtocolError):
        framing.recv_msg_within(b, 0.2)
    c, d = socket.socketpair()
    with c, d:  # in time: the message
        p.send(c, p.Promoted())
        assert p.recv(d, p.Promoted, timeout_s=0.2)[0] == p.Promoted()


def test_a_large_payload_arrives_whole(pair):
    a, b = pair
    payload = os.urandom(3 << 20)  # larger than one read and than the socket's buffer
    sender = threading.Thread(target=p.send, args=(a, p.Run(1.0, True), payload))
    sender.start()
    got, got_payload, _ = p.recv(b, p.Run)
    sender.join()
    assert got == p.Run(1.0, True) and got_payload == payload


def test_a_deadline_bounds_a_frame_sent_a_byte_at_a_time(pair):
    """A peer that writes a valid frame one byte every 50 ms passes every per-read timeout; the
    deadline bounds the whole message."""
    a, b = pair
    head = b'{"op":"promoted"}'
    frame = framing.PREFIX.pack(len(head), 0) + head
    stop = threading.Event()

    def dribble():
        for byte in frame:
            if stop.wait(0.05):
                return
            try:
                a.send(bytes([byte]))
            except OSError:
                return

    sender = threading.Thread(target=dribble)
    sender.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(p.ProtocolError, match="in time"):
            p.recv(b, p.Promoted, deadline=t0 + 0.3)
        # the whole frame would take 0.05 s a byte; 3 s (10x the deadline) only guards a hang
        assert time.monotonic() - t0 < 3
    finally:
        stop.set()
        sender.join()
    with pytest.raises(p.ProtocolError, match="in time"):  # a deadline already passed
        p.recv(b, p.Promoted, deadline=time.monotonic() - 1)


def test_what_a_state_or_cell_sends_has_a_small_header(pair):
    """A long header from the untrusted side is refused from its length prefix alone, before a
    byte of it is read."""
    a, b = pair
    for kind in (p.CellReady, p.CellDone, p.Promoted, p.ForkFailed, p.RolledBack):
        assert kind.max_header == p.SMALL_HEADER
    a.sendall(framing.PREFIX.pack(p.SMALL_HEADER + 1, 0))  # the header itself is never sent
    t0 = time.monotonic()
    with pytest.raises(p.ProtocolError, match="too large"):
        p.recv(b, p.CellDone, deadline=t0 + 30)
    assert time.monotonic() - t0 < 10  # at once, not at the deadline (30 s)
    c, d = socket.socketpair()
    with c, d:
        p.send(c, p.CellDone("ok", promoted=True))
        assert p.recv(d, p.CellDone, deadline=time.monotonic() + 1)[0] == p.CellDone("ok", True)
