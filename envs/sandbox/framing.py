"""The sandbox's framing: how a message travels on a UNIX socket, with its size limits and its
deadline. protocol.py builds the typed messages on it.

A message is two uint32 lengths (`PREFIX`: header, payload), a JSON object (the header) and raw
bytes (the payload, such as code or output). File descriptors travel with the length prefix
(SCM_RIGHTS). A reader bounds every size, since the state and cell processes at the other end of
some channels run untrusted code: a header, a payload and a number of descriptors of at most what
the expected message types carry (the headers of what a state or cell sends are small:
`SMALL_HEADER`). A reader given a deadline (`recv_msg(..., deadline=)`) bounds the whole message
by it, not each read: a peer that writes a frame a byte at a time cannot stretch a read past it.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

PREFIX = struct.Struct("!II")
MAX_HEADER = 1 << 16
"""Largest header, in bytes, any reader accepts."""
MAX_PAYLOAD = 1 << 26
"""Largest payload (code, or a call's output) of the messages that carry one."""
MAX_FDS = 4
"""Most file descriptors `recv_msg` accepts with one message unless told otherwise."""
SMALL_HEADER = 512
"""Largest header of the messages that a state or cell process sends (all have short fields)."""


class ProtocolError(Exception):
    """A peer sent something that is not a well-formed message, or hung up."""


encode_header = json.JSONEncoder(separators=(",", ":")).encode
decode_header = json.JSONDecoder().decode


def send_msg(sock: socket.socket, header: dict, payload: bytes = b"", fds=()) -> None:
    head = encode_header(header).encode()
    prefix = PREFIX.pack(len(head), len(payload))
    if fds:
        socket.send_fds(sock, [prefix], list(fds))
        sock.sendall(head + payload)
    else:
        sock.sendall(prefix + head + payload)


def _settle_timeout(sock: socket.socket, deadline: float | None) -> None:
    """Bound the next read of `sock` by `deadline` (time.monotonic()); ProtocolError once it has
    passed. Without a deadline, the socket's timeout is left as it is."""
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise ProtocolError("the peer's message did not arrive in time")
    sock.settimeout(left)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    chunks, left = [], n
    while left:
        _settle_timeout(sock, deadline)
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ProtocolError("peer closed the connection mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_msg(
    sock: socket.socket,
    max_payload: int = MAX_PAYLOAD,
    max_fds: int = MAX_FDS,
    max_header: int = MAX_HEADER,
    deadline: float | None = None,
):
    """Returns (header, payload, fds). Raises ProtocolError on EOF, a malformed message, one
    over the limits (a header over `max_header` bytes, a payload over `max_payload` bytes, more
    than `max_fds` descriptors; with `max_fds=0`, plain reads: the kernel discards descriptors
    sent along), or one not whole by `deadline` (time.monotonic(); every read is bounded by what
    is left of it, so a peer that sends a byte at a time cannot stretch the message past it).
    Without a deadline the socket's own timeout bounds each read. The descriptors received with
    a rejected message are closed."""
    prefix, fds = b"", []
    try:
        while len(prefix) < PREFIX.size:
            _settle_timeout(sock, deadline)
            if max_fds:
                data, new_fds, flags, _ = socket.recv_fds(sock, PREFIX.size - len(prefix), max_fds)
                fds.extend(new_fds)
                if flags & socket.MSG_CTRUNC:  # the kernel closed those that did not fit
                    raise ProtocolError(f"more than {max_fds} file descriptors with a message")
            else:  # descriptors sent along are closed by the kernel, unseen
                data = sock.recv(PREFIX.size - len(prefix))
            if not data:
                raise ProtocolError("peer closed the connection")
            prefix += data
        head_len, payload_len = PREFIX.unpack(prefix)
        if head_len > max_header or payload_len > max_payload:
            raise ProtocolError(f"message too large ({head_len}, {payload_len})")
        body = _recv_exact(sock, head_len + payload_len, deadline)
        header = decode_header(body[:head_len].decode())
        if not isinstance(header, dict):
            raise ProtocolError("message header is not an object")
        return header, body[head_len:], fds
    except (ProtocolError, OSError, ValueError) as exc:  # UnicodeError is a ValueError
        for fd in fds:
            os.close(fd)
        if isinstance(exc, TimeoutError):
            raise ProtocolError("the peer's message did not arrive in time") from exc
        raise ProtocolError(str(exc)) from exc


def recv_msg_within(sock: socket.socket, timeout_s: float, **kwargs):
    """recv_msg with every read bounded by `timeout_s`. The socket keeps that timeout (setting it
    costs two fcntl calls), so use this function for every read of a socket, or none."""
    if sock.gettimeout() != timeout_s:
        sock.settimeout(timeout_s)
    return recv_msg(sock, **kwargs)
