"""Run one file's upload: one verified object out, checkpoints in state along the way.

Durability order (docs/architecture.md): a part is recorded only after OSS returned its
ETag and the CRC64 (or, from a server without CRC64, the MD5 ETag) matched; the file is
`done` only after the object was verified, with URL, ETag, CRC64 and how it was verified
in the same transaction. Before Complete the file is re-stat'ed: if it
changed, the upload is aborted and the file requeued, so no object mixes versions.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

import structlog

from ossyncd import crashpoint
from ossyncd.body import Body, RateLimiter
from ossyncd.config import ObjectSpec, UploadConfig
from ossyncd.errors import (
    Cancelled,
    CredentialsUnavailable,
    FileChanged,
    FileGone,
    FileProblem,
    FileUnreadable,
    HostLimit,
    NoSuchUpload,
    NotSupported,
    ObjectExists,
    PermanentError,
    PlanError,
    StoreError,
    TransientError,
)
from ossyncd.log import level_enabled
from ossyncd.model import CRC64, Identity, PartRow, WriteResult
from ossyncd.objectspec import FileFacts, callback_headers, complete_headers, put_headers
from ossyncd.plan import choose_part_size, is_multipart, part_ranges
from ossyncd.retry import Backoff
from ossyncd.state import FileRow, State, UploadRow

log = structlog.get_logger(__name__)
PROGRESS_EVERY = 0.5  # seconds between bytes_done writes; status promises 1 s freshness
INVALID_PARTS = {"InvalidPart", "InvalidPartOrder", "EntityTooSmall"}
HOST_LIMITS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM}   # the host's condition, not the file's


class CancelScope:
    """A cancel flag that is also set when its parent is: pause/shutdown cancel every file,
    a failed part cancels only its own file's siblings."""

    def __init__(self, parent: "CancelScope | threading.Event | None" = None):
        self._own = threading.Event()
        self._parent = parent

    def set(self) -> None:
        self._own.set()

    def is_set(self) -> bool:
        return self._own.is_set() or (self._parent is not None and self._parent.is_set())

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._own.wait(min(left, 0.1))
        return True


@dataclass(frozen=True)
class Outcome:
    state: str               # done | queued | retry_wait | failed | gone
    error: str | None = None
    unchanged: bool = False  # done without sending: only the ctime had moved
    cancelled: bool = False  # queued again by pause or shutdown, not because the file changed


def stat_identity(path: str) -> Identity:
    return Identity.of(os.stat(path, follow_symlinks=False))


class Uploader:
    def __init__(self, state: State, store, cfg: UploadConfig, *, part_pool: ThreadPoolExecutor,
                 limiter: RateLimiter | None = None, url_for: Callable[[str], str],
                 on_progress: Callable[[int, int, int], None] | None = None,
                 spec_for: Callable[[str], ObjectSpec] | None = None,
                 denied_reason: Callable[[str], str | None] | None = None):
        self.state = state
        self.store = store
        self.cfg = cfg
        self.pool = part_pool
        self.limiter = limiter
        self.url_for = url_for
        self.on_progress = on_progress  # (file_id, bytes_done, total), for live displays
        self.backoff = Backoff(cfg.file_retry_delay, cfg.file_retry_delay_max)
        self.spec_for = spec_for or (lambda watch: ObjectSpec())   # a row's watch root -> what its objects get
        self.denied_reason = denied_reason   # key -> why it was refused, when the broker registration says

    def _hint(self, e: PermanentError, key: str) -> str:
        """What the failed reason adds to a permanent error: the broker registration's account of
        an AccessDenied when it explains it, else the generic hint."""
        if e.code == "AccessDenied" and self.denied_reason is not None:
            reason = self.denied_reason(key)
            if reason:
                return f"; {reason}"
        return _generic_hint(e)

    def _object(self, row: FileRow) -> tuple[ObjectSpec, FileFacts]:
        relpath = os.path.relpath(row.path, row.watch) if row.watch else os.path.basename(row.path)
        return self.spec_for(row.watch), FileFacts(relpath.replace(os.sep, "/"), row.size, row.mtime_ns,
                                                   path=row.path, watch=row.watch)

    # -- entry point -----------------------------------------------------------------------

    def run(self, row: FileRow, cancel: CancelScope | threading.Event | None = None, *,
            claimed: bool = False) -> Outcome:
        """Upload one queued file and record the outcome in state. Never raises for a
        problem with this file; raises StateError only if the state DB fails. `claimed`: the
        caller already moved the row to `uploading` (the scheduler does it per batch)."""
        scope = CancelScope(cancel)
        started = time.monotonic()
        if not claimed and not self.state.transition(row.id, "uploading", identity=row.identity):
            return Outcome("queued", "superseded by a newer version")
        try:
            mode, parts, key = self._upload(row, scope)
        except Cancelled:
            self.state.transition(row.id, "queued", identity=row.identity)
            return Outcome("queued", "cancelled", cancelled=True)
        except FileProblem as e:
            return self._file_problem(row, e)
        except CredentialsUnavailable as e:
            now = time.time()
            # come back when the credentials are next fetched: sooner would fail at once, later
            # would leave the file idle after STS is back (attempts are not counted either way)
            at = e.retry_at if e.retry_at and e.retry_at > now else now + min(self.cfg.file_retry_delay, 10.0)
            msg = f"waiting for credentials: {e}"
            self.state.transition(row.id, "retry_wait", error=msg, next_attempt_at=at, identity=row.identity)
            log.warning("credentials unavailable", path=row.path, error=str(e))
            return Outcome("retry_wait", msg)
        except ObjectExists as e:
            msg = e.detail
            self.state.transition(row.id, "exists", error=msg, identity=row.identity)
            log.warning("not uploaded: the key holds another object (overwrite = skip)", path=row.path, key=row.key)
            return Outcome("exists", msg)
        except PermanentError as e:
            msg = f"{e}{self._hint(e, e.key or row.object_key)}"
            self.state.transition(row.id, "failed", error=msg, count_attempt=True, identity=row.identity)
            log.error("upload failed", path=row.path, key=row.key, error=msg)
            return Outcome("failed", msg)
        except PlanError as e:
            self.state.transition(row.id, "failed", error=str(e), count_attempt=True, identity=row.identity)
            log.error("upload failed", path=row.path, key=row.key, error=str(e))
            return Outcome("failed", str(e))
        except (TransientError, StoreError, OSError) as e:
            if isinstance(e, StoreError) and e.code == "InvalidDigest":
                try:  # OSS got other bytes than we hashed: corruption in transit, unless the file changed
                    self._check_identity(row)
                except FileProblem as changed:
                    return self._file_problem(row, changed)
            return self._retry_later(row, f"{e} (will retry)")
        seconds = time.monotonic() - started
        if mode == "recognised":
            log.warning("the object at the key already holds these bytes (our own upload, its record lost in a "
                        "crash); done without sending", path=row.path, key=row.key)
            return Outcome("done")
        if mode == "unchanged":
            log.info("unchanged; only its ctime moved, the object already holds these bytes", path=row.path,
                     key=row.key, crc64=str(row.crc64))
            return Outcome("done", unchanged=True)
        if level_enabled("info"):   # building the line costs as much as a small file's DB work
            log.info("uploaded", path=row.path, key=key, size=row.size, mode=mode, parts=parts,
                     seconds=round(seconds, 3), mib_s=round(row.size / 1048576 / max(seconds, 1e-6), 2),
                     url=self.url_for(key))
        return Outcome("done")

    def _retry_later(self, row: FileRow, msg: str) -> Outcome:
        """retry_wait with the file's backoff; the attempt counts."""
        delay = self.backoff.delay(min(row.attempts, 16)) + self.cfg.file_retry_delay / 2
        self.state.transition(row.id, "retry_wait", error=msg, next_attempt_at=time.time() + delay,
                              count_attempt=True, identity=row.identity)
        log.warning("upload will be retried", path=row.path, error=msg, retry_in=round(delay, 1))
        return Outcome("retry_wait", msg)

    def _file_problem(self, row: FileRow, e: FileProblem) -> Outcome:
        if isinstance(e, HostLimit):   # the host may recover; the file is fine
            return self._retry_later(row, e.detail)
        if isinstance(e, (FileGone, FileChanged)):
            self.give_up_upload(row)
        if isinstance(e, FileGone):
            self.state.transition(row.id, "gone", error=e.detail, identity=row.identity)
            log.info("file vanished", path=row.path)
            return Outcome("gone", e.detail)
        if isinstance(e, FileChanged):
            self.state.transition(row.id, "queued", error=e.detail, identity=row.identity)
            log.info("file changed during upload; requeued", path=row.path)
            return Outcome("queued", e.detail)
        self.state.transition(row.id, "failed", error=e.detail, count_attempt=True, identity=row.identity)
        log.error("upload failed", path=row.path, error=e.detail)
        return Outcome("failed", e.detail)

    def give_up_upload(self, row: FileRow) -> None:
        """The file's multipart upload is no longer wanted (the file changed or vanished):
        abort it on the server and drop its record, so no parts keep costing storage."""
        up = self.state.upload_for(row.id)
        if up is not None:
            self._abort(up)

    def _abort(self, up: UploadRow) -> None:
        try:
            self.store.abort(up.key, up.upload_id)
        except StoreError as e:  # the orphan sweep will get it later
            log.warning("abort failed", key=up.key, upload_id=up.upload_id, error=str(e))
        self.state.drop_upload(up.id)

    # -- the upload ------------------------------------------------------------------------

    def _check_identity(self, row: FileRow) -> None:
        try:
            now = stat_identity(row.path)
        except FileNotFoundError:
            raise FileGone(row.path, "vanished before or during upload") from None
        if not row.identity.matches(now):
            raise FileChanged(row.path, "file changed since it was queued")

    def _upload(self, row: FileRow, scope: CancelScope) -> tuple[str, int, str]:
        """(mode, parts sent, the key the object is at)."""
        self._check_identity(row)
        try:
            # O_NONBLOCK: a FIFO swapped in after the scan must not block us; fstat below rejects it
            fd = os.open(row.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise FileGone(row.path, "vanished before upload") from None
        except PermissionError as e:
            raise FileUnreadable(row.path, f"cannot read: {e.strerror}; fix its permissions "
                                                      f"or run ossyncd as a user that can read it") from None
        except OSError as e:
            if e.errno in HOST_LIMITS:
                raise HostLimit(row.path, f"cannot open: {e.strerror}; the daemon is out of file "
                                  f"descriptors or memory: raise LimitNOFILE in the systemd unit (or `ulimit -n`) "
                                  f"or lower upload.max_files_in_flight (will retry)") from None
            raise FileUnreadable(row.path, f"cannot open: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_ino != row.inode:
            os.close(fd)
            raise FileChanged(row.path, "replaced by another file since it was queued")
        try:
            if row.check_crc and row.crc64 is not None and self._unchanged(row, fd, scope):
                return "unchanged", 0, row.object_key
            return self._send(row, fd, scope)
        finally:
            os.close(fd)

    def _send(self, row: FileRow, fd: int, scope: CancelScope) -> tuple[str, int, str]:
        """To row.key, or with overwrite = "rename" the first free stem-N.ext (docs/architecture.md §12).
        A 409 FileAlreadyExists whose object holds our bytes is ours (a crash lost the record)."""
        spec = self.spec_for(row.watch)
        up = self.state.upload_for(row.id) if spec.overwrite == "rename" else None   # only rename resumes a key
        for key in _candidates(row.key, spec.overwrite, up.key if up is not None else None):
            try:
                if is_multipart(row.size, self.cfg):
                    return "multipart", self._multipart(row, fd, scope, key), key
                self._simple(row, fd, scope, key)
                return "simple", 1, key
            except PermanentError as e:
                if e.code != "FileAlreadyExists":
                    raise
                if self._ours(row, fd, key, scope):
                    return "recognised", 0, key
                if spec.overwrite == "skip":
                    raise ObjectExists(e.op, key, f"an object already exists at {key} (overwrite = \"skip\")",
                                       status=409, code=e.code) from None
                if spec.overwrite != "rename":
                    raise PermanentError(e.op, key, f"an object already exists at {key} (overwrite = \"forbid\")",
                                         status=409, code=e.code) from None
                log.info("key taken; trying the next name (overwrite = rename)", path=row.path, key=key)
        raise PermanentError("PutObject", row.key, f"{MAX_RENAMES} names after {row.key} are all taken "
                             f"(overwrite = \"rename\"); move some objects away")

    def _ours(self, row: FileRow, fd: int, key: str, scope: CancelScope) -> bool:
        """Does the object at `key` hold exactly this file's bytes (HEAD: size and CRC64)? Then
        it is done. Needs oss:GetObject; without it the object counts as someone else's."""
        try:
            info = self.store.head(key, cancel=scope)
        except PermanentError as e:
            log.warning("cannot tell whether the existing object is ours: HeadObject was refused; grant "
                        "oss:GetObject (see `ossyncd policy`)", key=key, error=str(e))
            return False
        if info is None or info.size != row.size or info.crc64 is None:
            return False
        _, crc = Body(row.path, fd, 0, row.size, cancel=scope).checksum()
        if crc != info.crc64:
            return False
        self._check_identity(row)
        up = self.state.upload_for(row.id)
        if up is not None:
            self._abort(up)
        if not self.state.mark_done(row.id, row.identity, url=self.url_for(key), etag=info.etag, crc64=crc,
                                    mode="recognised", verification=CRC64,
                                    stored_key=key if key != row.key else None):
            raise FileChanged(row.path, "a newer version was seen during the upload")
        return True

    def _unchanged(self, row: FileRow, fd: int, scope: CancelScope) -> bool:
        """Only the ctime moved since `done` (a chmod, a rename, `touch -r`): if our bytes still
        have the object's CRC64, record the new identity instead of sending them again."""
        _, crc = Body(row.path, fd, 0, row.size, cancel=scope).checksum()
        if crc != row.crc64:
            return False          # a same-size rewrite with the mtime restored (`cp -p`): upload
        self._check_identity(row)
        if not self.state.mark_unchanged(row.id, row.identity):
            raise FileChanged(row.path, "a newer version was seen during the CRC64 check")
        return True

    def _progress(self, row: FileRow):
        last = [time.monotonic()]   # first write after PROGRESS_EVERY: small files need none

        def report(done: int) -> None:
            now = time.monotonic()
            if self.on_progress is not None:
                self.on_progress(row.id, done, row.size)
            if now - last[0] >= PROGRESS_EVERY:
                last[0] = now
                self.state.set_progress(row.id, done)
        return report

    def _simple(self, row: FileRow, fd: int, scope: CancelScope, key: str) -> None:
        body = Body(row.path, fd, 0, row.size, cancel=scope, limiter=self.limiter, progress=self._progress(row))
        _, crc = body.checksum()
        spec, facts = self._object(row)
        result = self.store.put(key, body, headers={**put_headers(spec, facts), **callback_headers(spec, facts)},
                                cancel=scope)
        crashpoint.hit("after_put")
        if result.crc64 != crc:  # the file changed between the checksum pass and the send
            raise FileChanged(row.path, "file changed while it was being uploaded")
        self._check_identity(row)
        self._mark_done(row, key, result, "simple")

    def _mark_done(self, row: FileRow, key: str, result: WriteResult, mode: str) -> None:
        """`done` with the callback's outcome: a failed callback never undoes or repeats the upload
        (docs/wire-protocol.md §9); a [[hook]] on callback_failed can act on it."""
        if result.callback == "failed":
            log.warning("upload callback failed; the object is stored", path=row.path, key=key,
                        error=result.callback_detail)
        if not self.state.mark_done(row.id, row.identity, url=self.url_for(key), etag=result.etag,
                                    crc64=result.crc64, mode=mode, verification=result.verification,
                                    stored_key=key if key != row.key else None, callback=result.callback,
                                    callback_detail=result.callback_detail):
            raise FileChanged(row.path, "a newer version was seen during the upload")

    def _multipart(self, row: FileRow, fd: int, scope: CancelScope, key: str) -> int:
        up = self._resume(row, fd, scope, key)
        if up is None:
            part_size = choose_part_size(row.size, self.cfg)
            upload_id = self.store.init_multipart(key, headers=put_headers(*self._object(row)), cancel=scope)
            crashpoint.hit("after_initiate")
            up = self.state.begin_upload(row.id, upload_id, key, part_size, row.identity)
            self._abort_strays(key, scope)
        ranges = part_ranges(row.size, up.part_size)
        recorded = self.state.parts(up.id)
        todo = [r for r in ranges if r.number not in recorded]
        base = sum(p.size for p in recorded.values())
        inflight: dict[int, int] = {}
        lock = threading.Lock()
        report = self._progress(row)

        def part_progress(number: int):
            def cb(sent: int) -> None:
                with lock:
                    inflight[number] = sent
                    total = base + sum(inflight.values())
                report(total)
            return cb

        def send(r) -> PartRow:
            body = Body(row.path, fd, r.offset, r.size, cancel=scope, limiter=self.limiter,
                        progress=part_progress(r.number))
            if self.store.verification_mode() != CRC64:   # MD5 up front: Content-MD5, and the ETag check
                body.checksum()
            res = self.store.upload_part(key, up.upload_id, r.number, body, cancel=scope)
            part = PartRow(r.number, res.etag, res.crc64, r.size)
            self.state.record_part(up.id, part.number, part.etag, part.crc64, part.size)
            nonlocal base
            with lock:
                inflight.pop(r.number, None)
                base += r.size
            return part

        try:
            self._run_window(todo, send, scope)
        except NoSuchUpload:  # aborted behind our back (a lifecycle rule, an admin)
            log.warning("multipart upload vanished while parts were sent; starting over", path=row.path,
                        key=key, upload_id=up.upload_id)
            self.state.drop_upload(up.id)
            raise TransientError("UploadPart", key, "upload vanished while parts were sent; starting over") from None
        self._check_identity(row)
        parts = sorted(self.state.parts(up.id).values(), key=lambda p: p.number)
        if [p.number for p in parts] != [r.number for r in ranges]:
            raise TransientError("CompleteMultipartUpload", key, "recorded parts do not cover the file")
        try:
            spec, facts = self._object(row)
            result = self.store.complete(key, up.upload_id, parts,
                                         headers={**complete_headers(spec), **callback_headers(spec, facts)},
                                         cancel=scope)
        except NoSuchUpload:
            # Either it was aborted, or an earlier Complete succeeded and its response was lost.
            # The upload-only role cannot read the object to tell (docs/architecture.md, verification), so
            # the file is sent once more rather than marked done unverified.
            log.warning("upload gone at Complete (aborted, or a lost Complete response); re-sending the file",
                        path=row.path, key=key, upload_id=up.upload_id, size=row.size)
            self.state.drop_upload(up.id)
            raise TransientError("CompleteMultipartUpload", key, "upload vanished before Complete; starting over") from None
        except PermanentError as e:
            if e.code in INVALID_PARTS:
                self._abort(up)
                raise TransientError("CompleteMultipartUpload", key, f"{e.code}; starting over") from None
            if e.code == "FileAlreadyExists":   # written meanwhile: this upload can never complete
                self._abort(up)
            raise
        crashpoint.hit("after_complete")
        self._mark_done(row, key, result, "multipart")
        return len(todo)

    def _run_window(self, todo, send, scope: CancelScope) -> None:
        """Keep up to parallel_parts parts of this file in flight on the shared pool; on the
        first failure cancel the rest of this file's parts and re-raise it."""
        pending: set[Future] = set()
        queue = list(todo)
        error: BaseException | None = None
        while queue or pending:
            while queue and len(pending) < self.cfg.parallel_parts and error is None and not scope.is_set():
                pending.add(self.pool.submit(send, queue.pop(0)))
            if not pending:
                break
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in finished:
                exc = f.exception()
                if exc is not None and (error is None or isinstance(error, Cancelled)):
                    error = exc
            if error is not None:
                scope.set()
                queue.clear()
        if error is not None:
            raise error
        if scope.is_set() and queue:
            raise Cancelled("cancelled")

    def _resume(self, row: FileRow, fd: int, scope: CancelScope, key: str) -> UploadRow | None:
        """Reconcile a checkpointed upload with the server (the server wins)."""
        up = self.state.upload_for(row.id)
        if up is None:
            return None
        if not up.identity.matches(row.identity) or up.key != key:
            log.info("file changed since its upload began; aborting the old upload", path=row.path)
            self._abort(up)
            return None
        local = self.state.parts(up.id)
        try:
            server = self.store.list_parts(up.key, up.upload_id, cancel=scope)
        except NoSuchUpload:
            log.info("checkpointed upload is gone on the server; starting over", path=row.path)
            self.state.drop_upload(up.id)
            return None
        except NotSupported:
            return up  # the server cannot list parts: trust our record
        ranges = {r.number: r for r in part_ranges(row.size, up.part_size)}
        keep: list[PartRow] = []
        for sp in server:
            mine = local.get(sp.number)
            r = ranges.get(sp.number)
            if r is None or sp.size != r.size:
                continue
            if mine is not None and mine.etag.upper() == sp.etag.upper() and mine.size == sp.size:
                keep.append(mine)
            else:
                adopted = self._adopt(row.path, fd, r, sp.etag)  # sent before a crash, never recorded
                if adopted is not None:
                    keep.append(adopted)
        self.state.set_parts(up.id, keep)
        log.info("resuming upload", path=row.path, upload_id=up.upload_id, parts_kept=len(keep),
                 parts_total=len(ranges))
        return up

    def _abort_strays(self, key: str, scope: CancelScope) -> None:
        """Abort open uploads of this key that state does not own: left by a lost Initiate
        response (the retry made another) or a kill between Initiate and its record. Only
        this daemon writes its keys, so they need not wait for the orphan sweep's max age."""
        try:
            strays = [u for u in self.store.list_uploads(key, cancel=scope) if u.key == key]
            if not strays:
                return
            owned = self.state.owned_upload_ids()
            for u in strays:
                if u.upload_id not in owned:
                    self.store.abort(u.key, u.upload_id, cancel=scope)
                    log.info("stray upload of this key aborted", key=key, upload_id=u.upload_id)
        except (StoreError, CredentialsUnavailable) as e:  # the orphan sweep gets them later
            log.warning("could not check for stray uploads", key=key, error=str(e))

    @staticmethod
    def _adopt(path: str, fd: int, r, etag: str) -> PartRow | None:
        """A part OSS holds but we never recorded: keep it if its ETag is the MD5 of our bytes."""
        md5, crc = Body(path, fd, r.offset, r.size).checksum()
        if md5.hex().upper() != etag.strip('"').upper():
            return None
        return PartRow(r.number, etag, crc, r.size)


MAX_RENAMES = 1000


def _candidates(key: str, overwrite: str, resume: str | None):
    """The keys to try: `key`, and with rename stem-1.ext, stem-2.ext, ... (`resume`: the key of a
    recorded upload, tried first so a restart continues where it was)."""
    yield resume if resume is not None and overwrite == "rename" else key
    if overwrite != "rename":
        return
    head, sep, name = key.rpartition("/")
    stem, dot, ext = name.partition(".") if not name.startswith(".") else (name, "", "")
    for n in range(1, MAX_RENAMES + 1):
        k = f"{head}{sep}{stem}-{n}{dot}{ext}"
        if k != resume:
            yield k


def _generic_hint(e: PermanentError) -> str:
    hints = {
        "AccessDenied": "; the credentials may not write this key: compare the role's policy and any "
                        "credentials.policy with `ossyncd policy`, and check the watch prefixes",
        "InvalidObjectName": "; the object key is not valid for OSS: rename the file",
        "NoSuchBucket": "; check oss.bucket and oss.endpoint",
    }
    return hints.get(e.code or "", "")
