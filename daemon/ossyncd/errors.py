"""The ossyncd error hierarchy.

    OssyncdError
    ├── ConfigError            bad configuration; names the key and the fix (exit code 2)
    ├── CredentialsError       no credentials from the configured source; .transient says
    │                          whether retrying can help, .source, .code (never holds a secret)
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


class CredentialsError(OssyncdError):
    """Credentials could not be obtained.

    ``transient``: retrying later may succeed (network, 5xx, throttling).
    Permanent errors need an operator (wrong key, missing role, bad config).
    ``source``: the source name; ``code``: the server/SDK error code, if any.
    The message names the source/field and what to do, and never holds a secret.
    """

    def __init__(self, message: str, *, transient: bool = False, source: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message = message
        self.transient = bool(transient)
        self.source = source
        self.code = code

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (f"CredentialsError({self.message!r}, transient={self.transient!r}, "
                f"source={self.source!r}, code={self.code!r})")

    def copy(self) -> "CredentialsError":
        return CredentialsError(self.message, transient=self.transient, source=self.source,
                                code=self.code)


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
