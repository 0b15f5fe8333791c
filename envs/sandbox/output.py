"""A cell's output as the supervisor keeps it: the head and tail of each stream, with a count of
what was left out, read from the cell's pipes."""

from __future__ import annotations

import os


class OutputBuffer:
    """Keeps the first and last `limit // 2` bytes of a stream and counts the rest."""

    def __init__(self, limit: int):
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > 2 * self.tail_limit:
                del self.tail[: len(self.tail) - self.tail_limit]

    @property
    def truncated(self) -> bool:
        return self.total > self.head_limit + self.tail_limit

    def value(self) -> bytes:
        if not self.truncated:
            return bytes(self.head + self.tail)
        tail = self.tail[-self.tail_limit :] if self.tail_limit else b""
        omitted = self.total - len(self.head) - len(tail)
        return bytes(self.head) + f"\n... [{omitted} bytes omitted] ...\n".encode() + bytes(tail)


def drain(streams: dict) -> None:
    """Feed `streams` what is left in their pipes, without waiting for more."""
    for fd, buf in streams.items():
        os.set_blocking(fd, False)
        try:
            while data := os.read(fd, 1 << 20):
                buf.feed(data)
        except BlockingIOError:
            pass
