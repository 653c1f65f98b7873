"""The ossyncd error hierarchy: every error ossyncd raises on purpose is one of these.
A command that ends with one prints `label: message` and exits with its `exit_code`
(cli.py does that in one place).

    OssyncdError               exit 1
    ├── ConfigError            bad configuration; names the key and the fix (exit 2)
    │   └── PolicyError        no RAM policy can be built from the bucket and prefixes
    ├── CredentialsError       no credentials from the configured source; .transient says
    │                          whether retrying can help, .source, .code (never holds a secret)
    ├── StateError             the state DB is locked, corrupt or unwritable; .clearable
    ├── CredentialsUnavailable no valid credentials now: uploads wait, nothing fails
    ├── CommandFailed          a command's step failed; carries its label and exit code
    ├── PlanError              the file cannot be split with the configured part size
    ├── Cancelled              cooperative cancellation (pause, shutdown); nothing is recorded
    ├── FileProblem            the local file
    │   ├── FileGone           vanished before or during the upload
    │   ├── FileChanged        its identity moved on: settle again
    │   ├── FileUnreadable     permissions, I/O: failed until `ossyncd retry`
    │   └── HostLimit          out of descriptors/memory on open: retried, never failed
    └── StoreError             an OSS call failed; .op, .key, .status, .code, .request_id
        ├── TransientError     retry with backoff: 5xx, 429, resets, timeouts
        │   ├── IntegrityError CRC64, MD5 (ETag, InvalidDigest) or size mismatch between what
        │   │                  we sent and what OSS stored
        │   └── AuthExpired    SecurityTokenExpired / InvalidAccessKeyId: refresh and retry,
        │                      never counted against a file's budget
        └── PermanentError     retrying cannot help: AccessDenied, InvalidObjectName, ...
            ├── NoSuchUpload   the multipart upload id is gone (completed, aborted, expired)
            ├── NotSupported   the server lacks the operation (e.g. ListParts)
            └── ObjectExists   overwrite = "skip" met another object at the key: state `exists`
"""

from __future__ import annotations


class OssyncdError(Exception):
    """Base of every error ossyncd raises on purpose."""

    exit_code = 1
    label = "error"


class ConfigError(OssyncdError):
    """The configuration is invalid. The message names the key and the fix."""

    exit_code = 2
    label = "config error"


class PolicyError(ConfigError, ValueError):
    """The policy cannot be built from the given bucket/prefixes."""


class PolicyTooLong(PolicyError):
    """The compact inline policy exceeds STS's Policy length limit."""


class CredentialsUnavailable(OssyncdError):
    """No valid credentials could be obtained; uploads wait, nothing is marked failed.
    ``retry_at``: when the credentials will next be fetched (epoch seconds), if known."""

    label = "credentials error"

    def __init__(self, message: str, retry_at: float | None = None):
        super().__init__(message)
        self.retry_at = retry_at


class CommandFailed(OssyncdError):
    """A step of a command failed: `label` names the step (`endpoint https://...`), the exit
    code is the cause's."""

    def __init__(self, label: str, message: str, exit_code: int = 1):
        super().__init__(message)
        self.label = label
        self.exit_code = exit_code


class PlanError(OssyncdError):
    """The file cannot be uploaded with the configured part size; the message says what to change."""


class CredentialsError(OssyncdError):
    """Credentials could not be obtained.

    ``transient``: retrying later may succeed (network, 5xx, throttling).
    Permanent errors need an operator (wrong key, missing role, bad config).
    ``source``: the source name; ``code``: the server/SDK error code, if any.
    ``retry_after``: seconds the server asked us to wait (HTTP Retry-After), if it said.
    The message names the source/field and what to do, and never holds a secret.
    """

    label = "credentials error"

    def __init__(self, message: str, *, transient: bool = False, source: str | None = None,
                 code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.transient = bool(transient)
        self.source = source
        self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (f"CredentialsError({self.message!r}, transient={self.transient!r}, "
                f"source={self.source!r}, code={self.code!r})")

    def copy(self) -> "CredentialsError":
        return CredentialsError(self.message, transient=self.transient, source=self.source,
                                code=self.code, retry_after=self.retry_after)


class StateError(OssyncdError):
    """The state DB cannot be used (locked by another daemon, corrupt, disk full).

    ``clearable``: the cause can go away without a restart (disk full, I/O error, busy),
    so a daemon retries; otherwise (corrupt, deleted, closed) it stops."""

    label = "state error"

    def __init__(self, message: str, *, clearable: bool = False):
        super().__init__(message)
        self.clearable = clearable


class Cancelled(OssyncdError):
    """An in-flight operation was cancelled (pause or shutdown)."""


class FileProblem(OssyncdError):
    """The local file, not OSS: what happens next depends on the subclass."""

    def __init__(self, path: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


class FileGone(FileProblem):
    """It vanished before or during the upload: the file is `gone`, its upload aborted."""


class FileChanged(FileProblem):
    """Its identity moved on (rewritten, replaced): requeued to settle again, upload aborted."""


class FileUnreadable(FileProblem):
    """It cannot be read (permissions, I/O): `failed` until `ossyncd retry`."""


class HostLimit(FileProblem):
    """The host ran out of descriptors or memory on open: retried later, never `failed`."""


class StoreError(OssyncdError):
    """An OSS request failed. ``retry_after``: seconds the server asked us to wait (the
    Retry-After header of a 429 or 503), if it said."""

    def __init__(self, op: str, key: str, message: str, *, status: int | None = None,
                 code: str | None = None, request_id: str | None = None, retry_after: float | None = None):
        where = f"{op} {key!r}" if key else op
        bits = [b for b in (str(status) if status else None, code) if b]
        super().__init__(f"{where}: {' '.join(bits) + ': ' if bits else ''}{message}")
        self.op = op
        self.key = key
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after


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


class ObjectExists(PermanentError):
    """overwrite = "skip": the key holds an object that is not ours; the file is left alone.
    ``detail``: the message without the operation prefix, for the file's row."""

    def __init__(self, op: str, key: str, message: str, **kw):
        super().__init__(op, key, message, **kw)
        self.detail = message
