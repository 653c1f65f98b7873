"""A byte range of a local file as a request body.

Each attempt opens a fresh reader (so a retry re-reads from the range start); the
reader computes CRC64 as bytes go out, honours cancellation within one block and
the bandwidth limiter, and reports progress. Nothing larger than one block is
held in memory, whatever the part size.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from ossyncd.crc import crc64
from ossyncd.errors import Cancelled, FileProblem

READ_BLOCK = 1 << 20


class RateLimiter:
    """A token bucket shared by every reader: `rate` bytes/s, bursts of one second."""

    def __init__(self, rate: int):
        self.rate = rate
        self._tokens = float(rate)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, n: int, cancel: threading.Event | None = None) -> None:
        if self.rate <= 0:
            return
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= min(n, self.rate):
                    self._tokens -= n
                    return
                wait = (min(n, self.rate) - self._tokens) / self.rate
            if cancel is not None and cancel.wait(min(wait, 0.25)):
                raise Cancelled("cancelled while throttled")
            elif cancel is None:
                time.sleep(min(wait, 0.25))


class Body:
    def __init__(self, path: str, offset: int, size: int, *, cancel: threading.Event | None = None,
                 limiter: RateLimiter | None = None, progress: Callable[[int], None] | None = None,  # bytes sent in this attempt
                 fd: int | None = None):
        self.path = path
        self.offset = offset
        self.size = size
        self.cancel = cancel
        self.limiter = limiter
        self.progress = progress
        self._fd = fd
        self.sent = 0
        self.crc64 = 0

    @contextmanager
    def open(self) -> Iterator["_Reader"]:
        self.sent = 0
        self.crc64 = 0
        if self.progress is not None:
            self.progress(0)
        own = self._fd is None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW) if own else self._fd
        except FileNotFoundError:
            raise FileProblem(self.path, "gone", "vanished before upload") from None
        except PermissionError as e:
            raise FileProblem(self.path, "unreadable", f"cannot read: {e.strerror}; fix its permissions") from None
        try:
            yield _Reader(self, fd)
        finally:
            if own:
                os.close(fd)


class _Reader:
    """File-like for requests/urllib3: read() and __len__ only (sized, not seekable)."""

    def __init__(self, body: Body, fd: int):
        self._b = body
        self._fd = fd

    def __len__(self) -> int:
        return self._b.size

    def read(self, n: int = -1) -> bytes:
        b = self._b
        if b.cancel is not None and b.cancel.is_set():
            raise Cancelled(f"{b.path}: cancelled")
        left = b.size - b.sent
        if left <= 0:
            return b""
        n = left if n is None or n < 0 else min(n, left)
        n = min(n, READ_BLOCK)
        if b.limiter is not None:
            b.limiter.consume(n, b.cancel)
        data = os.pread(self._fd, n, b.offset + b.sent)
        if not data:
            raise FileProblem(b.path, "changed", "file shrank while it was being uploaded")
        b.crc64 = crc64(data, b.crc64)
        b.sent += len(data)
        if b.progress is not None:
            b.progress(b.sent)
        return data
