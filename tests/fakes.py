"""In-memory stand-ins for in-process tests: `MemoryStore` implements ossyncd.store.ObjectStore
with the rules the emulator (tests/ossemu/storage.py) and OSS apply; tests/test_store_contract.py
runs the same cases on it and on OssStore against the emulator, so the two cannot drift apart."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from ossyncd.body import Body
from ossyncd.crc import combine_parts, crc64
from ossyncd.errors import IntegrityError, NoSuchUpload, PermanentError
from ossyncd.model import CRC64, CancelFlag, ObjectInfo, OpenUpload, PartRow, ServerPart, WriteResult

MIN_PART_SIZE = 100 * 1024   # OSS: every part but the last at least 100 KiB (EntityTooSmall)


@dataclass
class _Blob:
    data: bytes
    etag: str
    crc64: int


@dataclass
class _Upload:
    key: str
    upload_id: str
    initiated: float
    parts: dict[int, _Blob] = field(default_factory=dict)


def _md5_etag(data: bytes) -> str:
    return hashlib.md5(data).hexdigest().upper()


def _flip_middle_bit(data: bytes) -> bytes:
    if not data:
        return data
    mid = len(data) // 2
    return data[:mid] + bytes([data[mid] ^ 0x01]) + data[mid + 1:]


class MemoryStore:
    """Objects and multipart uploads in dicts, under one lock (the uploader calls from many threads).

    Test knobs:
      corrupt_next   the next N writes (PutObject, UploadPart) store their body with one bit flipped,
                     like the emulator's flip_bit fault, so the CRC64 check must catch it;
      before         called as before(op, key) at the start of every call (to block, or to change
                     the file behind the uploader's back);
      requests       a Counter of calls per operation name.
    """

    def __init__(self):
        self.objects: dict[str, _Blob] = {}
        self.uploads: dict[str, _Upload] = {}
        self.corrupt_next = 0
        self.before: Callable[[str, str], None] | None = None
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._seq = 0

    # -- the ObjectStore ------------------------------------------------------------------

    def put(self, key: str, body: Body, *, headers: dict[str, str] | None = None,
            cancel: CancelFlag | None = None) -> WriteResult:
        self._enter("PutObject", key)
        blob = self._receive("PutObject", key, body)
        with self._lock:
            self.objects[key] = blob
        return WriteResult(blob.etag, blob.crc64, CRC64)

    def init_multipart(self, key: str, *, headers: dict[str, str] | None = None,
                       cancel: CancelFlag | None = None) -> str:
        self._enter("InitiateMultipartUpload", key)
        with self._lock:
            self._seq += 1
            upload_id = f"{self._seq:08X}{os.urandom(8).hex().upper()}"
            self.uploads[upload_id] = _Upload(key, upload_id, time.time())
        return upload_id

    def upload_part(self, key: str, upload_id: str, number: int, body: Body, *,
                    cancel: CancelFlag | None = None) -> WriteResult:
        self._enter("UploadPart", key)
        with self._lock:
            self._upload("UploadPart", key, upload_id)   # NoSuchUpload before reading the body, as OSS
        blob = self._receive("UploadPart", key, body)
        with self._lock:
            self._upload("UploadPart", key, upload_id).parts[number] = blob
        return WriteResult(blob.etag, blob.crc64, CRC64)

    def complete(self, key: str, upload_id: str, parts: list[PartRow], *, headers: dict[str, str] | None = None,
                 cancel: CancelFlag | None = None) -> WriteResult:
        op = "CompleteMultipartUpload"
        self._enter(op, key)
        with self._lock:
            up = self._upload(op, key, upload_id)
            chosen = self._validate_parts(key, up, parts)
            data = b"".join(b.data for b in chosen)
            stored_crc = combine_parts([(b.crc64, len(b.data)) for b in chosen])
            etag = hashlib.md5(b"".join(bytes.fromhex(b.etag) for b in chosen)).hexdigest().upper()
            self.objects[key] = _Blob(data, f"{etag}-{len(chosen)}", stored_crc)
            del self.uploads[upload_id]
        expected = combine_parts([(p.crc64, p.size) for p in parts])
        if stored_crc != expected:
            raise IntegrityError(op, key, f"object CRC64 {stored_crc} differs from the parts' combined {expected}")
        return WriteResult(f"{etag}-{len(chosen)}", stored_crc, CRC64)

    def head(self, key: str, *, cancel: CancelFlag | None = None) -> ObjectInfo | None:
        self._enter("HeadObject", key)
        with self._lock:
            blob = self.objects.get(key)
        return None if blob is None else ObjectInfo(len(blob.data), blob.crc64, blob.etag)

    def list_parts(self, key: str, upload_id: str, *, cancel: CancelFlag | None = None) -> list[ServerPart]:
        self._enter("ListParts", key)
        with self._lock:
            up = self._upload("ListParts", key, upload_id)
            return [ServerPart(n, b.etag, len(b.data)) for n, b in sorted(up.parts.items())]

    def abort(self, key: str, upload_id: str, *, cancel: CancelFlag | None = None) -> None:
        self._enter("AbortMultipartUpload", key)
        with self._lock:
            up = self.uploads.get(upload_id)
            if up is not None and up.key == key:   # an upload already gone is not an error
                del self.uploads[upload_id]

    def list_uploads(self, prefix: str, *, cancel: CancelFlag | None = None) -> list[OpenUpload]:
        self._enter("ListMultipartUploads", prefix)
        with self._lock:
            ups = sorted((u for u in self.uploads.values() if u.key.startswith(prefix)),
                         key=lambda u: (u.key, u.upload_id))
        return [OpenUpload(u.key, u.upload_id, u.initiated) for u in ups]

    def last_credentials(self) -> Any:
        return None   # nothing signs requests here

    def verification_mode(self) -> str | None:
        return CRC64   # every write answers with the CRC64 of what it stored

    # -- reading back ---------------------------------------------------------------------

    def data(self, key: str) -> bytes:
        """The stored bytes of `key` (KeyError if there is no such object)."""
        with self._lock:
            return self.objects[key].data

    # -- rules ----------------------------------------------------------------------------

    def _enter(self, op: str, key: str) -> None:
        with self._lock:
            self.requests[op] += 1
        if self.before is not None:
            self.before(op, key)

    def _upload(self, op: str, key: str, upload_id: str) -> _Upload:
        up = self.uploads.get(upload_id)
        if up is None or up.key != key:
            raise NoSuchUpload(op, key, f"upload {upload_id} does not exist (aborted or completed)",
                               status=404, code="NoSuchUpload")
        return up

    def _receive(self, op: str, key: str, body: Body) -> _Blob:
        """Read the body as a request would, store it (maybe corrupted), and verify it as OssStore does."""
        reader = body.open()
        data = b"".join(iter(lambda: reader.read(1 << 20), b""))
        if body.sent != body.size:
            raise IntegrityError(op, key, f"sent {body.sent} of {body.size} bytes")
        with self._lock:
            if self.corrupt_next > 0:
                self.corrupt_next -= 1
                data = _flip_middle_bit(data)
        blob = _Blob(data, _md5_etag(data), crc64(data))
        if blob.crc64 != body.crc64:
            raise IntegrityError(op, key, f"CRC64 mismatch: sent {body.crc64}, stored {blob.crc64}")
        return blob

    @staticmethod
    def _validate_parts(key: str, up: _Upload, parts: list[PartRow]) -> list[_Blob]:
        op = "CompleteMultipartUpload"
        if not parts:
            raise PermanentError(op, key, "no parts given", status=400, code="MalformedXML")
        chosen: list[_Blob] = []
        last = 0
        parts = sorted(parts, key=lambda p: p.number)   # oss2 sends them sorted by number
        for p in parts:
            if p.number <= last:
                raise PermanentError(op, key, f"part {p.number} given twice", status=400, code="InvalidPartOrder")
            last = p.number
            blob = up.parts.get(p.number)
            if blob is None or p.etag.strip('"').upper() != blob.etag:
                raise PermanentError(op, key, f"part {p.number} not found or its ETag differs",
                                     status=400, code="InvalidPart")
            chosen.append(blob)
        for p, blob in zip(parts[:-1], chosen[:-1]):
            if len(blob.data) < MIN_PART_SIZE:
                raise PermanentError(op, key, f"part {p.number} is smaller than {MIN_PART_SIZE} bytes",
                                     status=400, code="EntityTooSmall")
        return chosen


class FakeClock:
    """Epoch seconds that move only when told: Scheduler.tick(now) and Sweeper.tick(now) take it."""

    def __init__(self, start: float | None = None):
        self.now = time.time() if start is None else start

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now
