"""Records shared by the store and the state, so neither imports the other (docs/architecture.md):
the version of a file, as the daemon compares it everywhere, and what parts and uploads are."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1   # SQLite INTEGER's range


def clamp_ns(ns: int) -> int:
    # A clock set to 2300 gives st_mtime_ns beyond SQLite's INTEGER. Clamping in the one
    # place identities are built keeps both sides of every comparison equal.
    return ns if INT64_MIN <= ns <= INT64_MAX else min(max(ns, INT64_MIN), INT64_MAX)


@dataclass(frozen=True, slots=True)
class Identity:
    """size, mtime and inode say which version a file is; ctime catches the rewrite that
    restores the mtime (`cp -p`, `touch -r`), since nothing can set the ctime back.
    ctime_ns None: unknown (a row recorded before ctimes were kept)."""

    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int | None = None

    @classmethod
    def of(cls, st: os.stat_result) -> "Identity":
        return cls(st.st_size, clamp_ns(st.st_mtime_ns), st.st_ino, clamp_ns(st.st_ctime_ns))

    def same_but_ctime(self, other: "Identity") -> bool:
        """Equal size, mtime and inode: a different ctime alone may be a chmod."""
        return (self.size, self.mtime_ns, self.inode) == (other.size, other.mtime_ns, other.inode)

    def matches(self, other: "Identity") -> bool:
        """The same version, where an unknown ctime matches any."""
        return self.same_but_ctime(other) and (
            self.ctime_ns is None or other.ctime_ns is None or self.ctime_ns == other.ctime_ns)


# verification modes, recorded per file
CRC64 = "crc64"
MD5 = "md5"


@dataclass(frozen=True)
class PartRow:
    """A part recorded after OSS returned its ETag and its CRC64 matched."""

    number: int
    etag: str
    crc64: int
    size: int


@dataclass(frozen=True)
class WriteResult:
    etag: str
    crc64: int               # of the bytes stored: OSS's, or ours when OSS sent none and MD5 verified them
    verification: str = CRC64
    callback: str | None = None          # with x-oss-callback: "ok" or "failed" (the object is stored either way)
    callback_detail: str | None = None   # the application server's answer, or why the callback failed


@dataclass(frozen=True)
class ObjectInfo:
    """What HeadObject says about an existing object (conflict recognition)."""
    size: int
    crc64: int | None        # None from a server that sends no x-oss-hash-crc64ecma
    etag: str


@dataclass(frozen=True)
class ServerPart:
    number: int
    etag: str
    size: int


@dataclass(frozen=True)
class OpenUpload:
    key: str
    upload_id: str
    initiated: float


class CancelFlag(Protocol):
    """What a store call is given to learn that its caller gave up: a threading.Event, or the
    uploader's CancelScope."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float) -> bool: ...
