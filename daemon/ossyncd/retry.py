"""Retries as a wrapper around any ObjectStore (the store itself makes single attempts).

- TransientError: exponential backoff with full jitter, `attempts` times per request.
- AuthExpired: refresh the credentials once for everyone (single flight) and retry at
  once; this never uses up the request's attempts, because an expiring token is normal.
- CredentialsError from the provider: the credentials source is down; the caller gets
  `CredentialsUnavailable` so the file waits instead of failing.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import structlog

from ossyncd.body import Body
from ossyncd.errors import AuthExpired, Cancelled, CredentialsUnavailable, TransientError
from ossyncd.model import CancelFlag, ObjectInfo, OpenUpload, PartRow, ServerPart, WriteResult

if TYPE_CHECKING:   # the seam's type only: retries need no oss2
    from ossyncd.store import ObjectStore

log = structlog.get_logger(__name__)
MAX_AUTH_REFRESHES = 5
T = TypeVar("T")


RETRY_AFTER_MAX = 60.0   # seconds: the most of a server's Retry-After that one request retry waits


@dataclass(frozen=True)
class Backoff:
    base: float = 0.5
    cap: float = 20.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        return rng() * min(self.cap, self.base * (2 ** attempt))


class RetryingStore:
    """An ObjectStore that retries its inner ObjectStore (see the module docstring). Each method
    keeps the inner method's contract; `cancel` set ends a backoff wait with Cancelled."""

    def __init__(self, inner: ObjectStore, credentials, *, attempts: int = 5, backoff: Backoff = Backoff(),
                 on_retry: Callable[[str, Exception], None] | None = None):
        self.inner = inner
        self.credentials = credentials
        self.attempts = attempts
        self.backoff = backoff
        self.on_retry = on_retry

    def _unavailable(self, e: Exception) -> CredentialsUnavailable:
        retry_at = getattr(self.credentials, "retry_at", None)
        return CredentialsUnavailable(str(e), retry_at=retry_at() if callable(retry_at) else None)

    def _run(self, op: str, fn: Callable[..., T], *args, cancel: CancelFlag | None = None, **kw: Any) -> T:
        from ossyncd.credentials import CredentialsError

        failures = 0
        refreshes = 0
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{op}: cancelled")
            try:
                return fn(*args, cancel=cancel, **kw)
            except CredentialsError as e:
                raise self._unavailable(e) from None
            except AuthExpired as e:
                refreshes += 1
                if refreshes > MAX_AUTH_REFRESHES:
                    raise
                log.info("credentials rejected, refreshing", op=op, code=e.code)
                try:
                    self.credentials.force_refresh(self.inner.last_credentials())
                except CredentialsError as ce:
                    raise self._unavailable(ce) from None
            except TransientError as e:
                failures += 1
                if failures > self.attempts:
                    raise
                if self.on_retry:
                    self.on_retry(op, e)
                # the server's Retry-After is a floor under the jittered backoff
                wait = max(self.backoff.delay(failures - 1), min(e.retry_after or 0.0, RETRY_AFTER_MAX))
                # debug: one line per file state change, not per request (docs/architecture.md §7)
                log.debug("retrying", op=op, error=str(e), attempt=failures, wait=round(wait, 2))
                if cancel is not None:
                    if cancel.wait(wait):
                        raise Cancelled(f"{op}: cancelled") from None
                else:
                    threading.Event().wait(wait)

    def put(self, key: str, body: Body, *, headers: dict[str, str] | None = None,
            cancel: CancelFlag | None = None) -> WriteResult:
        return self._run("PutObject", self.inner.put, key, body, headers=headers, cancel=cancel)

    def init_multipart(self, key: str, *, headers: dict[str, str] | None = None,
                       cancel: CancelFlag | None = None) -> str:
        return self._run("InitiateMultipartUpload", self.inner.init_multipart, key, headers=headers,
                         cancel=cancel)

    def upload_part(self, key: str, upload_id: str, number: int, body: Body, *,
                    cancel: CancelFlag | None = None) -> WriteResult:
        return self._run("UploadPart", self.inner.upload_part, key, upload_id, number, body, cancel=cancel)

    def complete(self, key: str, upload_id: str, parts: list[PartRow], *, headers: dict[str, str] | None = None,
                 cancel: CancelFlag | None = None) -> WriteResult:
        return self._run("CompleteMultipartUpload", self.inner.complete, key, upload_id, parts, headers=headers,
                         cancel=cancel)

    def head(self, key: str, *, cancel: CancelFlag | None = None) -> ObjectInfo | None:
        return self._run("HeadObject", self.inner.head, key, cancel=cancel)

    def list_parts(self, key: str, upload_id: str, *, cancel: CancelFlag | None = None) -> list[ServerPart]:
        return self._run("ListParts", self.inner.list_parts, key, upload_id, cancel=cancel)

    def abort(self, key: str, upload_id: str, *, cancel: CancelFlag | None = None) -> None:
        return self._run("AbortMultipartUpload", self.inner.abort, key, upload_id, cancel=cancel)

    def list_uploads(self, prefix: str, *, cancel: CancelFlag | None = None) -> list[OpenUpload]:
        return self._run("ListMultipartUploads", self.inner.list_uploads, prefix, cancel=cancel)

    def last_credentials(self) -> Any:
        return self.inner.last_credentials()

    def verification_mode(self) -> str | None:
        return self.inner.verification_mode()
