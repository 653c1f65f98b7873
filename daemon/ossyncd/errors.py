"""The ossyncd error hierarchy.

    OssyncdError
    ├── ConfigError            bad configuration; names the key and the fix (exit code 2)
    ├── StateError             the state DB is locked, corrupt or unwritable
    ├── Cancelled              cooperative cancellation (pause, shutdown); nothing is recorded
    ├── FileProblem            the local file: .reason is one of
    │                          "gone" (vanished), "changed" (identity moved on), "unreadable",
    │                          "host" (out of descriptors/memory on open: retried, never failed)
    └── StoreError             an OSS call failed; .op, .key, .status, .code, .request_id
        ├── TransientError     retry with backoff: 5xx, 429, resets, timeouts
        │   ├── IntegrityError CRC64, MD5 (ETag, InvalidDigest) or size mismatch between what
        │   │                  we sent and what OSS stored
        │   └── AuthExpired    SecurityTokenExpired / InvalidAccessKeyId: refresh and retry,
        │                      never counted against a file's budget
        └── PermanentError     retrying cannot help: AccessDenied, InvalidObjectName, ...
            ├── NoSuchUpload   the multipart upload id is gone (completed, aborted, expired)
            └── NotSupported   the server lacks the operation (e.g. ListParts)
"""

from __future__ import annotations


class OssyncdError(Exception):
    """Base of every error ossyncd raises on purpose."""


class ConfigError(OssyncdError):
    """The configuration is invalid. The message names the key and the fix."""


class StateError(OssyncdError):
    """The state DB cannot be used (locked by another daemon, corrupt, disk full).

    ``clearable``: the cause can go away without a restart (disk full, I/O error, busy),
    so a daemon retries; otherwise (corrupt, deleted, closed) it stops."""

    def __init__(self, message: str, *, clearable: bool = False):
        super().__init__(message)
        self.clearable = clearable


class Cancelled(OssyncdError):
    """An in-flight operation was cancelled (pause or shutdown)."""


class FileProblem(OssyncdError):
    def __init__(self, path: str, reason: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail


class StoreError(OssyncdError):
    def __init__(self, op: str, key: str, message: str, *, status: int | None = None,
                 code: str | None = None, request_id: str | None = None):
        where = f"{op} {key!r}" if key else op
        bits = [b for b in (str(status) if status else None, code) if b]
        super().__init__(f"{where}: {' '.join(bits) + ': ' if bits else ''}{message}")
        self.op = op
        self.key = key
        self.status = status
        self.code = code
        self.request_id = request_id


class TransientError(StoreError):
    pass


class IntegrityError(TransientError):
    pass


class AuthExpired(TransientError):
    pass


class PermanentError(StoreError):
    pass


class NoSuchUpload(PermanentError):
    pass


class NotSupported(PermanentError):
    pass
