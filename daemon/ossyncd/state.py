"""Durable state: the only module that talks to SQLite (through sqlite-utils).

Every transition is one transaction. The DB runs in WAL mode so that
``ossyncd status`` can read while the daemon writes. CRC64 values are
stored as decimal text because they do not fit SQLite's signed INTEGER.
"""

from __future__ import annotations

import fcntl
import functools
import json
import operator
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, fields
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple, TypeVar

from ossyncd import crashpoint
from ossyncd.errors import StateError
from ossyncd.log import get_logger
from ossyncd.model import Identity, PartRow

if TYPE_CHECKING:
    import sqlite_utils

log = get_logger(__name__)

R = TypeVar("R")
# exists: overwrite = "skip" met an object at the key that is not ours; not retried (docs/architecture.md §3)
# waiting: settled, but its ready marker is not there yet (markers.py); never due, never an event
STATES = ("settling", "waiting", "queued", "uploading", "retry_wait", "done", "failed", "skipped", "gone", "exists")
# the file states that are events (docs/architecture.md §8, outbox); `done` is announced as `uploaded`
# `exists` (overwrite = "skip" met another writer's object) is a `skipped` event too
EVENT_OF_STATE = {"done": "uploaded", "failed": "failed", "skipped": "skipped", "gone": "gone", "exists": "skipped"}
# not a state: an upload callback failed on a `done` file (docs/wire-protocol.md §9), in mark_done's transaction
CALLBACK_FAILED = "callback_failed"
EVENT_KINDS = tuple(dict.fromkeys(EVENT_OF_STATE.values())) + (CALLBACK_FAILED,)
DELIVERY_STATES = ("pending", "delivered", "dead")
# (kind, watch, path) -> the names of the hooks that want this event; none: nothing is written
Router = Callable[[str, str, str], list[str]]


@dataclass(frozen=True)
class FileRow:
    id: int
    path: str
    watch: str
    key: str
    size: int
    mtime_ns: int
    inode: int
    state: str
    attempts: int
    next_attempt_at: float | None
    error: str | None
    url: str | None
    etag: str | None
    crc64: int | None
    uploaded_at: float | None
    bytes_done: int
    updated_at: float
    mode: str | None
    verification: str | None = None   # how the object was verified: crc64 | md5
    ctime_ns: int | None = None
    check_crc: int = 0        # 1: only the ctime moved since `done`; compare CRC64 before sending
    stored_key: str | None = None   # where overwrite = "rename" stored it (stem-N.ext); None: at `key`
    callback: str | None = None     # the upload callback of the last upload: ok | failed; None: none sent
    callback_detail: str | None = None   # the application server's answer, or why the callback failed

    @property
    def object_key(self) -> str:
        """The key the object is (or is being) stored under."""
        return self.stored_key or self.key

    @property
    def identity(self) -> Identity:
        return Identity(self.size, self.mtime_ns, self.inode, self.ctime_ns)


@dataclass(frozen=True)
class UploadRow:
    id: int
    file: int
    upload_id: str
    key: str
    part_size: int
    size: int
    mtime_ns: int
    inode: int
    created_at: float
    ctime_ns: int | None = None

    @property
    def identity(self) -> Identity:
        return Identity(self.size, self.mtime_ns, self.inode, self.ctime_ns)


@dataclass(slots=True)
class _DoneRequest:
    """One mark_done call waiting for the group commit that holds its row."""
    file_id: int
    identity: Identity
    values: list
    now: float
    callback_failed: bool = False
    result: bool | None = None
    error: StateError | None = None
    finished: bool = False


ROW_PAGE = 500   # rows the rescan holds at once (State.child_rows)
AFTER_SUBDIR_PAGE = 8   # the read after a child folder's block: a parent of many folders holds few files


class KnownRow(NamedTuple):
    """What the rescan compares with the disk: a row's path, state and identity. A
    `subdir` marker names a child folder that holds rows (its other fields are empty).
    A NamedTuple with the identity's fields flat: a rescan reads one per row of the tree,
    straight from the cursor's tuples (docs/architecture.md §8)."""
    path: str
    state: str
    size: int = 0
    mtime_ns: int = 0
    inode: int = 0
    ctime_ns: int | None = None
    subdir: int = 0   # 1 for a marker; the cursor selects a constant 0, so a row maps to this in C

    @property
    def identity(self) -> Identity:
        return Identity(self.size, self.mtime_ns, self.inode, self.ctime_ns)


_AS_KNOWN = functools.partial(tuple.__new__, KnownRow)   # a cursor row -> KnownRow, in C
_PATH = operator.itemgetter(0)
_NOT_MINUS_1 = functools.partial(operator.ne, -1)


def printable_path(path: str) -> str:
    """SQLite TEXT must be valid UTF-8; a name that is not (kept by os.fsdecode as
    surrogates) is stored with its bad bytes shown as \\xNN."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def _migration_1(db: sqlite_utils.Database) -> None:
    db.execute("""
        CREATE TABLE files (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL UNIQUE,
            watch TEXT NOT NULL DEFAULT '',
            key TEXT NOT NULL DEFAULT '',
            size INTEGER NOT NULL DEFAULT 0,
            mtime_ns INTEGER NOT NULL DEFAULT 0,
            inode INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL,
            error TEXT,
            url TEXT,
            etag TEXT,
            crc64 TEXT,
            uploaded_at REAL,
            bytes_done INTEGER NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL,
            mode TEXT
        )""")
    db.execute("CREATE INDEX files_state ON files(state, next_attempt_at)")
    db.execute("""
        CREATE TABLE uploads (
            id INTEGER PRIMARY KEY,
            file INTEGER NOT NULL UNIQUE REFERENCES files(id) ON DELETE CASCADE,
            upload_id TEXT NOT NULL,
            key TEXT NOT NULL,
            part_size INTEGER NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            inode INTEGER NOT NULL,
            created_at REAL NOT NULL
        )""")
    db.execute("""
        CREATE TABLE parts (
            upload INTEGER NOT NULL REFERENCES uploads(id) ON DELETE CASCADE,
            number INTEGER NOT NULL,
            etag TEXT NOT NULL,
            crc64 TEXT NOT NULL,
            size INTEGER NOT NULL,
            PRIMARY KEY (upload, number)
        )""")
    db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")


def _migration_2(db: sqlite_utils.Database) -> None:
    db.execute("CREATE INDEX files_state_id ON files(state, id)")


def _migration_verification(db: sqlite_utils.Database) -> None:
    """files.verification: crc64 or md5 (a server that returns no CRC64); NULL before this."""
    db.execute("ALTER TABLE files ADD COLUMN verification TEXT")


def _migration_ctime(db: sqlite_utils.Database) -> None:
    # NULL ctime_ns on existing rows means "unknown": compared by CRC64, not re-uploaded
    db.execute("ALTER TABLE files ADD COLUMN ctime_ns INTEGER")
    db.execute("ALTER TABLE files ADD COLUMN check_crc INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE uploads ADD COLUMN ctime_ns INTEGER")


def _migration_stored_key(db: sqlite_utils.Database) -> None:
    """files.stored_key: the key overwrite = "rename" chose (NULL: `key` itself)."""
    db.execute("ALTER TABLE files ADD COLUMN stored_key TEXT")




def _migration_events(db: sqlite_utils.Database) -> None:
    """The outbox: one row per event and hook, written in the transaction of the file's state
    change; `event_id` is the same for every hook, so receivers can de-duplicate."""
    db.execute("""
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            event_id TEXT NOT NULL,
            hook TEXT NOT NULL,
            kind TEXT NOT NULL,
            path TEXT NOT NULL,
            payload TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            error TEXT,
            created_at REAL NOT NULL,
            delivered_at REAL
        )""")
    db.execute("CREATE INDEX events_due ON events(state, next_attempt_at)")


def _migration_callback(db: sqlite_utils.Database) -> None:
    """files.callback (ok | failed, NULL: none sent) and callback_detail: the OSS upload
    callback's outcome for the last upload (docs/wire-protocol.md §9)."""
    db.execute("ALTER TABLE files ADD COLUMN callback TEXT")
    db.execute("ALTER TABLE files ADD COLUMN callback_detail TEXT")


MIGRATIONS = [_migration_1, _migration_2, _migration_verification, _migration_ctime, _migration_stored_key,
              _migration_events, _migration_callback]
_IDENTITY_SQL = " AND size=? AND mtime_ns=? AND inode=? AND ctime_ns IS ?"
_FILE_COLS = ", ".join(f.name for f in fields(FileRow))
_UPLOAD_COLS = ", ".join(f.name for f in fields(UploadRow))


@dataclass(frozen=True)
class EventRow:
    id: int
    event_id: str
    hook: str
    kind: str
    path: str
    payload: str      # JSON: the event as delivered (events.py)
    state: str        # pending | delivered | dead
    attempts: int
    next_attempt_at: float
    error: str | None
    created_at: float
    delivered_at: float | None


_EVENT_COLS = ", ".join(f.name for f in fields(EventRow))


def _identity_params(i: Identity) -> list:
    return [i.size, i.mtime_ns, i.inode, i.ctime_ns]


def _file(row: tuple) -> FileRow:
    r = FileRow(*row)
    return r if r.crc64 is None else FileRow(**{**r.__dict__, "crc64": int(r.crc64)})


# SQLite primary result codes (the low byte of sqlite_errorcode)
_BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 5, 6, 8, 10, 11, 13, 14, 26
_READONLY_DBMOVED = 1032
HEALTH_SIZE = 4096      # the health file is rewritten in place, so a full disk cannot stop it


def _write_problem(directory: Path) -> str | None:
    """Why the process cannot write in `directory`, or to a file (read-only mount, permissions), or None."""
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return f"read-only file system on {directory}"
    except OSError as e:
        return f"{e.strerror} on {directory}"
    if not os.access(directory, os.W_OK):
        return f"permission denied on {directory} for uid {os.geteuid()}"
    return None


def _unwritable_fix(directory: Path) -> str:
    return (f"give the daemon's user write access to {directory} (ownership, mount options, "
            f"or ReadWritePaths= in the unit)")


def state_error(path: Path, e: sqlite3.Error) -> StateError:
    """A StateError for a SQLite error on the DB at `path`: the cause, the fix, and
    whether the daemon may retry (see StateError.clearable)."""
    code = getattr(e, "sqlite_errorcode", None)
    base = code & 0xFF if code is not None else None
    d = path.parent
    if code == _READONLY_DBMOVED:
        return StateError(f"state DB {path} was deleted or replaced while in use; restore it from a backup, "
                          f"or restart ossyncd to start a new one (files are re-checked and re-uploaded)")
    if base in (_CORRUPT, _NOTADB):
        return _damaged(path, f"is corrupt ({e})")
    if base == _FULL:
        return StateError(f"state DB {path}: disk full; free space on {d}", clearable=True)
    if base == _IOERR:
        return StateError(f"state DB {path}: I/O error ({e}); check the disk under {d} (dmesg)", clearable=True)
    if base in (_BUSY, _LOCKED):
        return StateError(f"state DB {path}: locked ({e}); another process holds a long transaction on it",
                          clearable=True)
    if base in (_READONLY, _CANTOPEN):
        why = _write_problem(d) or str(e)
        return StateError(f"state DB {path}: cannot open or write it or its -wal/-shm files: {why}; "
                          f"{_unwritable_fix(d)}", clearable=True)
    return StateError(f"state DB {path}: {e}")


RECOVERY = "docs/state-recovery.md"
_MAGIC = b"SQLite format 3\0"


def _truncation(path: Path) -> str | None:
    """Why the DB file at `path` is cut short or is no SQLite file at all, from its 100-byte
    header (no SQLite call), or None. A short file with an empty WAL is what a truncation
    leaves; SQLite itself would only fail once it reads a missing page, long after start."""
    try:
        with open(path, "rb") as f:
            head = f.read(100)
        size = os.stat(path).st_size
        wal = os.stat(f"{path}-wal").st_size if os.path.exists(f"{path}-wal") else 0
    except OSError:
        return None   # opening it reports the cause
    if size == 0:
        return None
    if len(head) < 100 or head[:16] != _MAGIC:
        return f"is not a SQLite database ({size} bytes of something else)"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages, counter, valid_for = (int.from_bytes(head[o:o + 4], "big") for o in (28, 24, 92))
    # the in-header size is valid only when written by the same change (SQLite file format 1.3.7);
    # with frames in the WAL the file may legitimately lag behind until the next checkpoint
    if valid_for == counter and wal == 0 and pages * page > size:
        return f"is truncated: {size} bytes, its header says {pages * page}"
    return None


def _damaged(path: Path, why: str) -> StateError:
    return StateError(f"state DB {path} {why}; stop ossyncd and move it aside (`ossyncd state rebuild` does: "
                      f"files are then re-checked and re-uploaded as needed, see {RECOVERY})")


class State:
    """The daemon's durable record of files, multipart uploads and parts.

    Every method raises StateError (never a bare sqlite3 error); after close() they all do."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._read_lock = threading.Lock()          # guards _reader, the second connection
        self._reader: sqlite3.Connection | None = None
        self._lockfile: int | None = None
        self._health: int | None = None
        self._health_failed = False
        self._closed = False
        self._readonly = readonly
        self.router: Router | None = None    # set by the daemon from its [[hook]] sections
        self._done_mu = threading.Lock()     # guards _done_queue only (mark_done's group commit)
        self._done_queue: list[_DoneRequest] = []
        self.done_commits = 0                # transactions mark_done's group commit ran
        self._tx_thread: int | None = None   # the thread inside transaction(), if any
        if self.path.is_dir():
            raise StateError(f"state.path {self.path} is a directory; set state.path to a file in it, "
                             f"e.g. {self.path / 'state.db'}")
        cut = _truncation(self.path)
        if cut:
            raise _damaged(self.path, cut)
        try:
            self._writer: sqlite_utils.Database | None = None    # what runs transactions
            self.db: sqlite_utils.Database | sqlite3.Connection
            if readonly:
                # a reader (status, list) runs plain queries: importing sqlite-utils would cost
                # it about 60 ms of its start (docs/architecture.md §15)
                self.db = self._connect_readonly()
            else:
                import sqlite_utils
                emptied = self._create_file()
                conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
                # no plugins: the state DB is ours alone, and their lookup scans every installed
                # distribution's entry points (about 20 ms and 2 MiB per start)
                self.db = self._writer = sqlite_utils.Database(conn, execute_plugins=False)
            self.db.execute("PRAGMA foreign_keys=ON")
            self.schema: int = self.db.execute("PRAGMA user_version").fetchone()[0]
            if readonly:
                self._check_schema_readonly()
            else:
                if emptied:
                    log.warning("state DB was empty; starting a new one: every file in the watch folders is "
                                "re-checked against the bucket", path=str(self.path), recovery=RECOVERY)
                self.db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL survives a process crash (kill -9); a power loss may drop
                # the last commits, which only causes a re-upload, never a false `done`.
                self.db.execute("PRAGMA synchronous=NORMAL")
                self._migrate()
            st = os.stat(self.path)
            self._file_id = (st.st_dev, st.st_ino)
        except sqlite3.Error as e:
            raise state_error(self.path, e) from None

    def _create_file(self) -> bool:
        """Create the DB file (0600) if missing; True if it existed with 0 bytes (its content lost)."""
        new = not self.path.exists()
        emptied = not new and self.path.stat().st_size == 0 and not os.path.exists(f"{self.path}-wal")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            raise StateError(f"state DB {self.path}: directory {self.path.parent} does not exist; create it "
                             f"(the unit's StateDirectory= does) or change state.path") from None
        except OSError as e:
            # the file itself may be what is read-only (a bind mount, chattr +i), not its folder
            where = self.path if self.path.exists() and _write_problem(self.path) else self.path.parent
            why = _write_problem(where) or e.strerror
            raise StateError(f"state DB {self.path}: cannot open it for writing: {why}; "
                             f"{_unwritable_fix(where)}, or change state.path") from None
        os.close(fd)
        if new:
            os.chmod(self.path, 0o600)
        return emptied

    # -- lifecycle -------------------------------------------------------------------------

    def _newer(self) -> StateError:
        return StateError(f"state DB {self.path} has schema {self.schema}, newer than this ossyncd "
                          f"({len(MIGRATIONS)}): a newer ossyncd wrote it; upgrade ossyncd, or move the DB aside "
                          f"to start a new one (`ossyncd state rebuild`, see {RECOVERY})")

    def _check_schema_readonly(self) -> None:
        """A reader cannot read a newer schema; 0 (a new, empty DB) reads as no rows (cli)."""
        if self.schema > len(MIGRATIONS):
            raise self._newer()

    def _migrate(self) -> None:
        with self._lock:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise self._newer()
            if version == len(MIGRATIONS):
                return
            # one transaction: a concurrent reader (status, list) sees the old schema or the new
            # one, never one in between whose columns it would miss; a kill keeps the old one
            db = self._transactions()
            with db.atomic():
                for migration in MIGRATIONS[version:]:
                    migration(db)
                db.execute(f"PRAGMA user_version={len(MIGRATIONS)}")
            self.schema = len(MIGRATIONS)

    @staticmethod
    def _lock_path(db_path: str | os.PathLike) -> str:
        # the resolved path: a symlink to the DB must meet the same lock
        return f"{os.path.realpath(db_path)}.lock"

    def acquire_daemon_lock(self, hint: str = "stop it first, or give this instance its own state.path") -> None:
        """Single instance: hold an exclusive flock on '<db>.lock' for the process lifetime."""
        lock_path = self._lock_path(self.path)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = Path(lock_path).read_text().strip() or "another process"
            raise StateError(f"state DB {self.path} is in use by another ossyncd (pid {holder}); {hint}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lockfile = fd

    @staticmethod
    def lock_holder(db_path: str | os.PathLike) -> int | None:
        """The pid of the daemon holding the DB, or None when no daemon runs."""
        lock_path = State._lock_path(db_path)
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)

    def check_file(self) -> None:
        """Raise StateError if the DB path no longer names the open file (deleted or replaced):
        writes would go to an unlinked inode that `status`, `pause` and a restart never see."""
        try:
            st = os.stat(self.path)
            now = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            now = None
        if now != self._file_id:
            what = "deleted" if now is None else "replaced by another file"
            raise StateError(f"state DB {self.path} was {what} while the daemon ran; nothing more can be "
                             f"recorded, so the daemon stops; restore the file, or restart ossyncd to start "
                             f"a new DB (files are then re-checked and re-uploaded)")

    # -- health file: what `status` shows when the DB itself cannot be written -------------------

    @staticmethod
    def health_path(db_path: str | os.PathLike) -> str:
        return f"{os.path.realpath(db_path)}.health"

    def open_health(self) -> None:
        """Create '<db>.health' at its full size now, so later in-place rewrites need no new space."""
        try:
            fd = os.open(self.health_path(self.path), os.O_RDWR | os.O_CREAT, 0o600)
            os.pwrite(fd, b" " * HEALTH_SIZE, 0)
            self._health = fd
        except OSError as e:
            log.warning("health file not written; `status` cannot show state DB errors",
                        path=self.health_path(self.path), error=e.strerror)

    def write_health(self, health: dict) -> None:
        """Rewrite '<db>.health' in place at its fixed size (no new blocks on a full disk)."""
        if self._health is None:
            return
        health = {**health, "pid": os.getpid()}
        data = json.dumps(health).encode()
        for key in ("loop_error", "state_error"):   # a very long message is cut to fit
            if len(data) > HEALTH_SIZE and health.get(key):
                health[key] = health[key][:300] + "..."
                data = json.dumps(health).encode()
        try:
            with self._lock:   # close() may run meanwhile: never write to a closed (reused) fd
                if self._health is not None:
                    os.pwrite(self._health, data.ljust(HEALTH_SIZE), 0)
            self._health_failed = False
        except OSError as e:
            if not self._health_failed:   # once, not at every heartbeat
                log.warning("health file not written; `status` cannot show state DB errors",
                            path=self.health_path(self.path), error=e.strerror)
            self._health_failed = True

    @staticmethod
    def read_health(db_path: str | os.PathLike) -> dict:
        """The running daemon's health record ({} if none or unreadable)."""
        for _ in range(3):   # a read may meet a rewrite in progress
            try:
                with open(State.health_path(db_path), "rb") as f:
                    return json.loads(f.read(HEALTH_SIZE) or b"{}")
            except OSError:
                return {}
            except ValueError:
                time.sleep(0.01)
        return {}

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._closed = True
            self.db.close()
            if self._reader is not None:
                self._reader.close()
            for fd in (self._lockfile, self._health):
                if fd is not None:
                    os.close(fd)
            self._lockfile = self._health = None

    @contextmanager
    def _guard(self, write: bool):
        """Hold the lock, run a transaction if `write`, and turn SQLite errors into StateError."""
        with self._lock:
            if self._closed:
                raise self._closed_error()
            try:
                if write:
                    with self._transactions().atomic():
                        yield
                        crashpoint.hit("in_commit")   # a kill with the transaction open (tests/chaos)
                else:
                    yield
            except sqlite3.OperationalError as e:
                if self._readonly and 0 < self.schema < len(MIGRATIONS) and str(e).startswith("no such"):
                    raise StateError(f"state DB {self.path} has schema {self.schema}, older than this ossyncd "
                                     f"({len(MIGRATIONS)}): the daemon upgrades it when it starts; start or "
                                     f"restart it (`ossyncd run`), then try again") from None
                raise state_error(self.path, e) from None
            except sqlite3.Error as e:
                raise state_error(self.path, e) from None

    def _transactions(self) -> sqlite_utils.Database:
        if self._writer is None:   # a caller's bug: status and list only read
            raise StateError(f"state DB {self.path} is open read-only here; nothing recorded")
        return self._writer

    def _closed_error(self) -> StateError:
        return StateError(f"state DB {self.path} is closed (the daemon is stopping); nothing recorded")

    def _connect_readonly(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=10)

    def _read_beside(self, sql: str, params: Iterable = ()) -> list[tuple]:
        """A read on a second connection, beside the writer (WAL): a count over the whole table
        takes tens of ms at a million rows, and status lines, heartbeats and metrics scrapes
        must not hold up the scheduler's reads and writes meanwhile (docs/architecture.md §8)."""
        if self._readonly:
            return self._all(sql, params)
        with self._read_lock:
            if self._closed:
                raise self._closed_error()
            try:
                if self._reader is None:
                    self._reader = self._connect_readonly()
                return self._reader.execute(sql, list(params)).fetchall()
            except sqlite3.Error as e:
                raise state_error(self.path, e) from None

    def _write(self, sql: str, params: Iterable = ()) -> sqlite3.Cursor:
        with self._guard(write=True):
            return self.db.execute(sql, list(params))

    def _one(self, sql: str, params: Iterable = ()) -> tuple | None:
        with self._guard(write=False):
            return self.db.execute(sql, list(params)).fetchone()

    def _all(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with self._guard(write=False):
            return self.db.execute(sql, list(params)).fetchall()

    # -- files -----------------------------------------------------------------------------

    def get(self, path: str) -> FileRow | None:
        row = self._one(f"SELECT {_FILE_COLS} FROM files WHERE path = ?", [path])
        return _file(row) if row else None

    def get_by_id(self, file_id: int) -> FileRow | None:
        row = self._one(f"SELECT {_FILE_COLS} FROM files WHERE id = ?", [file_id])
        return _file(row) if row else None

    def observe(self, path: str, watch: str, key: str, identity: Identity,
                *, state: str = "queued", now: float | None = None) -> tuple[FileRow, bool]:
        """Record a version of a file. Returns (row, is_new_version).

        A new identity resets the file to `state` with a fresh attempt budget; the same
        identity leaves the row alone. Only the ctime moved on a `done` file: queued with
        check_crc, so the uploader compares CRC64 before sending anything.
        """
        now = time.time() if now is None else now
        with self._guard(write=True):
            old = self.get(path)
            same_key = old is not None and old.key == key and old.state not in ("gone", "skipped")
            if old is not None and same_key and old.identity == identity:
                return old, False
            check_crc = 0
            if old is not None and same_key and old.identity.same_but_ctime(identity):
                if old.state == "done" and old.crc64 is not None:
                    check_crc = 1
                elif old.ctime_ns is None:   # unknown since the upgrade: the same version
                    self.db.execute("UPDATE files SET ctime_ns=? WHERE id=?", [identity.ctime_ns, old.id])
                    return self._written(self.get(path), path), False
            if old:
                self.db.execute(
                    "UPDATE files SET watch=?, key=?, size=?, mtime_ns=?, inode=?, ctime_ns=?, check_crc=?, state=?,"
                    " attempts=0, next_attempt_at=NULL, error=NULL, bytes_done=0, stored_key=NULL, updated_at=?"
                    " WHERE id=?",
                    [watch, key, *_identity_params(identity), check_crc, state, now, old.id])
            else:
                self.db.execute(
                    "INSERT INTO files (path, watch, key, size, mtime_ns, inode, ctime_ns, state, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [path, watch, key, *_identity_params(identity), state, now])
            return self._written(self.get(path), path), True

    def _written(self, row: R | None, what: str) -> R:
        """A row read back in the transaction that wrote it; missing only if the DB lost it."""
        if row is None:
            raise StateError(f"{self.path}: the row for {what} is missing right after it was written; "
                             f"the state DB may be damaged: check it with `sqlite3 {self.path} 'PRAGMA integrity_check'`")
        return row

    def mark_skipped(self, path: str, watch: str, reason: str, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        path = printable_path(path)
        with self._guard(write=True):
            old = self.get(path)
            n = self.db.execute(
                "INSERT INTO files (path, watch, state, error, updated_at) VALUES (?, ?, 'skipped', ?, ?)"
                " ON CONFLICT(path) DO UPDATE SET state='skipped', error=excluded.error, updated_at=excluded.updated_at"
                " WHERE files.state != 'skipped' OR files.error IS NOT excluded.error",
                [path, watch, reason, now]).rowcount
            if n and (old is None or old.state != "skipped"):
                self._emit(self.get(path), now)

    def transition(self, file_id: int, state: str, *, error: str | None = None,
                   next_attempt_at: float | None = None, count_attempt: bool = False,
                   identity: Identity | None = None, now: float | None = None) -> bool:
        """Move a file to `state`. With `identity`, only if the row still describes that
        version (a newer version observed meanwhile must not be overwritten)."""
        assert state in STATES, state
        now = time.time() if now is None else now
        sql = "UPDATE files SET state=?, error=?, next_attempt_at=?, attempts=attempts+?, updated_at=? WHERE id=?"
        params = [state, error, next_attempt_at, int(count_attempt), now, file_id]
        if identity is not None:
            sql += _IDENTITY_SQL
            params += _identity_params(identity)
        with self._guard(write=True):
            before = self._one("SELECT state FROM files WHERE id=?", [file_id]) if state in EVENT_OF_STATE else None
            if self.db.execute(sql, params).rowcount != 1:
                return False
            if before is not None and before[0] != state:   # a state change, never a repeat of one
                self._emit_for(file_id, now)
            return True

    def start_uploads(self, rows: Iterable[FileRow], *, now: float | None = None) -> set[int]:
        """Dispatch: move these rows to `uploading` in one transaction, each only if it still
        has the identity it was read with. Returns the ids that moved."""
        now = time.time() if now is None else now
        moved: set[int] = set()
        with self._guard(write=True):
            for r in rows:
                if self.db.execute(
                        "UPDATE files SET state='uploading', error=NULL, next_attempt_at=NULL, updated_at=?"
                        " WHERE id=?" + _IDENTITY_SQL, [now, r.id, *_identity_params(r.identity)]).rowcount:
                    moved.add(r.id)
        return moved

    def hold_queued(self, error: str, next_attempt_at: float, *, now: float | None = None) -> list[str]:
        """Every `queued` row to `retry_wait` with `error` (the dispatch is held: no credentials),
        in one transaction. Returns the paths that moved."""
        if self._one("SELECT 1 FROM files WHERE state='queued' LIMIT 1") is None:
            return []   # the usual case at each tick of an outage: no write transaction
        now = time.time() if now is None else now
        with self._guard(write=True):
            paths = [p for (p,) in self.db.execute("SELECT path FROM files WHERE state='queued'")]
            self.db.execute("UPDATE files SET state='retry_wait', error=?, next_attempt_at=?, updated_at=?"
                            " WHERE state='queued'", [error, next_attempt_at, now])
        return paths

    def mark_unchanged(self, file_id: int, identity: Identity, *, now: float | None = None) -> bool:
        """Only the ctime moved and the CRC64 still matches the object: done again, with
        the new identity already recorded, and nothing sent."""
        now = time.time() if now is None else now
        return self._write(
            "UPDATE files SET state='done', check_crc=0, error=NULL, next_attempt_at=NULL, bytes_done=size,"
            " updated_at=? WHERE id=?" + _IDENTITY_SQL, [now, file_id, *_identity_params(identity)]).rowcount == 1

    def mark_done(self, file_id: int, identity: Identity, *, url: str, etag: str, crc64: int,
                  mode: str, verification: str = "crc64", stored_key: str | None = None,
                  callback: str | None = None, callback_detail: str | None = None,
                  now: float | None = None) -> bool:
        """The object of this version is verified: record it (and its upload callback's outcome),
        its event and forget the upload, in one transaction. False (and nothing written) if the row
        moved on to a newer version. A failed callback is a `callback_failed` event besides `uploaded`.

        Group commit (docs/architecture.md §4): the rows of workers that finish meanwhile go
        into the same transaction; each call returns only after the commit holding its row."""
        now = time.time() if now is None else now
        req = _DoneRequest(file_id, identity, [url, etag, str(crc64), mode, verification, now, stored_key, callback,
                                               callback_detail, now], now, callback == "failed")
        if self._tx_thread == threading.get_ident():   # inside this thread's transaction(): it commits
            with self._guard(write=True):
                return self._apply_done(req)
        with self._done_mu:
            self._done_queue.append(req)
        with self._lock:   # whoever gets the lock first commits every row queued so far
            if not req.finished:
                self._commit_done_batch()
        if req.error is not None:
            raise req.error
        return bool(req.result)

    def _commit_done_batch(self) -> None:
        """One transaction for the queued `done` rows; results are handed out only after it
        committed, so no caller reports `done` that a crash could still undo."""
        with self._done_mu:
            batch, self._done_queue = self._done_queue, []
        results: list[bool] = []
        try:
            with self._guard(write=True):
                results = [self._apply_done(r) for r in batch]
        except StateError as e:
            for r in batch:
                r.error, r.finished = e, True
            return
        self.done_commits += 1
        for r, ok in zip(batch, results):
            r.result, r.finished = ok, True

    def _apply_done(self, r: "_DoneRequest") -> bool:
        n = self.db.execute(
            "UPDATE files SET state='done', url=?, etag=?, crc64=?, mode=?, verification=?, uploaded_at=?,"
            " error=NULL, check_crc=0, next_attempt_at=NULL, bytes_done=size, stored_key=?, callback=?,"
            " callback_detail=?, updated_at=? WHERE id=?" + _IDENTITY_SQL,
            [*r.values, r.file_id, *_identity_params(r.identity)]).rowcount
        if n:
            self.db.execute("DELETE FROM uploads WHERE file=?", [r.file_id])
            if self.router is not None:   # without hooks the row is not even read
                row = self.get_by_id(r.file_id)
                self._emit(row, r.now)
                if r.callback_failed:
                    self._emit(row, r.now, kind=CALLBACK_FAILED)
        return n == 1

    def set_progress(self, file_id: int, bytes_done: int) -> None:
        self._write("UPDATE files SET bytes_done=? WHERE id=?", [bytes_done, file_id])

    def requeue(self, path: str | None = None, *, states: tuple[str, ...] = ("failed",),
                now: float | None = None) -> int:
        """failed -> queued (all, or one path). Returns how many rows moved."""
        now = time.time() if now is None else now
        marks = ",".join("?" * len(states))
        sql = (f"UPDATE files SET state='queued', attempts=0, next_attempt_at=NULL, error=NULL, updated_at=?"
               f" WHERE state IN ({marks})")
        params: list = [now, *states]
        if path is not None:
            sql += " AND path=?"
            params.append(path)
        return self._write(sql, params).rowcount

    def reset_interrupted(self) -> int:
        """After a crash: files left `uploading` go back to the queue (checkpoints kept)."""
        return self._write("UPDATE files SET state='queued' WHERE state='uploading'").rowcount

    def _listing(self, select: str, order: str, state: str | None, limit: int | None) -> list:
        """The rows of ``select`` (all, or in one state), in ``order``, at most ``limit``."""
        sql, params = select, []
        if state:
            sql += " WHERE state=?"
            params.append(state)
        sql += f" ORDER BY {order}"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self._all(sql, params)

    def files(self, state: str | None = None, *, limit: int | None = None) -> list[FileRow]:
        return [_file(r) for r in self._listing(f"SELECT {_FILE_COLS} FROM files", "path", state, limit)]

    def counts(self) -> dict[str, int]:
        return {s: n for s, n in self._read_beside("SELECT state, count(*) FROM files GROUP BY state")}

    def last_upload_at(self) -> float | None:
        """When the latest upload was recorded done (the fleet heartbeat's last_upload)."""
        row = self._one("SELECT max(uploaded_at) FROM files WHERE state='done'")
        return row[0] if row else None

    def due(self, now: float, *, limit: int = 1000) -> list[FileRow]:
        """Queued files, and retry_wait files whose time has come, oldest first."""
        # two indexed queries: an OR across states would sort every queued row on each call
        retry = self._all(f"SELECT {_FILE_COLS} FROM files WHERE state='retry_wait' AND next_attempt_at <= ?"
                          " ORDER BY next_attempt_at LIMIT ?", [now, limit])
        queued = self._all(f"SELECT {_FILE_COLS} FROM files WHERE state='queued' ORDER BY id LIMIT ?",
                           [limit - len(retry)])
        return [_file(r) for r in retry + queued]

    def recent_failures(self, limit: int = 10) -> list[FileRow]:
        return [_file(r) for r in self._all(
            f"SELECT {_FILE_COLS} FROM files WHERE state IN ('failed', 'retry_wait', 'skipped', 'exists')"
            " ORDER BY updated_at DESC LIMIT ?", [limit])]

    def child_rows(self, watch: str, directory: str, *, page: int = ROW_PAGE) -> Iterator[list[KnownRow]]:
        """The rows of the files directly in `directory`, in path order, a page at a time: the
        rescan's sorted cursor (docs/architecture.md §8). Rows further down come as one
        `subdir` marker per child folder, whose block is then skipped over. A short read per
        page on the UNIQUE(path) index: the lock is not held between pages."""
        base = directory.rstrip("/") + "/"
        return self._pages(watch, base, page, children=True)

    def rows_under(self, watch: str, directory: str, *, page: int = ROW_PAGE) -> Iterator[list[KnownRow]]:
        """Every row below `directory`, in path order, a page at a time."""
        return self._pages(watch, directory.rstrip("/") + "/", page, children=False)

    def _pages(self, watch: str, base: str, page: int, *, children: bool) -> Iterator[list[KnownRow]]:
        # "/" is 0x2F and "0" 0x30: every path that starts with P + "/" sorts in [P/, P0)
        hi = base[:-1] + "0"
        lo, inclusive, limit = base, True, page
        n, slashes = len(base), base.count("/")
        while True:
            rows = self._all(
                "SELECT path, state, size, mtime_ns, inode, ctime_ns, 0 FROM files"
                f" WHERE path {'>=' if inclusive else '>'} ? AND path < ? AND watch=? ORDER BY path LIMIT ?",
                [lo, hi, watch, limit])
            cut = -1
            # a row further down than a child has a "/" after base: counted for the page in C,
            # and only then found
            if children and "".join(map(_PATH, rows)).count("/") != len(rows) * slashes:
                cut = list(map(_NOT_MINUS_1, map(str.find, map(_PATH, rows), repeat("/"), repeat(n)))).index(True)
            if cut < 0:
                out = list(map(_AS_KNOWN, rows))
            else:   # the first row in a child folder: mark it, skip the folder's block
                out = list(map(_AS_KNOWN, rows[:cut]))
                p = rows[cut][0]
                sub = p[:p.index("/", n)]
                out.append(KnownRow(sub, "", subdir=1))
                # what follows a child folder is often the next one: a short read finds it
                lo, inclusive, limit = sub + "0", True, min(page, AFTER_SUBDIR_PAGE)
            if out:
                yield out
            if cut < 0:
                if len(rows) < limit:
                    return
                lo, inclusive, limit = rows[-1][0], False, min(page, limit * 4)

    # -- multipart uploads -----------------------------------------------------------------

    def upload_for(self, file_id: int) -> UploadRow | None:
        row = self._one(f"SELECT {_UPLOAD_COLS} FROM uploads WHERE file=?", [file_id])
        return UploadRow(*row) if row else None

    def uploads(self) -> list[UploadRow]:
        return [UploadRow(*r) for r in self._all(f"SELECT {_UPLOAD_COLS} FROM uploads")]

    def begin_upload(self, file_id: int, upload_id: str, key: str, part_size: int,
                     identity: Identity, *, now: float | None = None) -> UploadRow:
        now = time.time() if now is None else now
        i = identity
        with self._guard(write=True):
            self.db.execute("DELETE FROM uploads WHERE file=?", [file_id])
            self.db.execute(
                "INSERT INTO uploads (file, upload_id, key, part_size, size, mtime_ns, inode, ctime_ns, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [file_id, upload_id, key, part_size, i.size, i.mtime_ns, i.inode, i.ctime_ns, now])
            return self._written(self.upload_for(file_id), f"upload of file {file_id}")

    def record_part(self, upload: int, number: int, etag: str, crc64: int, size: int) -> None:
        self._write("INSERT OR REPLACE INTO parts (upload, number, etag, crc64, size) VALUES (?, ?, ?, ?, ?)",
                    [upload, number, etag, str(crc64), size])

    def parts(self, upload: int) -> dict[int, PartRow]:
        return {n: PartRow(n, e, int(c), s) for n, e, c, s in self._all(
            "SELECT number, etag, crc64, size FROM parts WHERE upload=? ORDER BY number", [upload])}

    def set_parts(self, upload: int, parts: Iterable[PartRow]) -> None:
        """Replace the recorded parts (reconciliation: the server wins)."""
        with self._guard(write=True):
            self.db.execute("DELETE FROM parts WHERE upload=?", [upload])
            for p in parts:
                self.db.execute("INSERT INTO parts (upload, number, etag, crc64, size) VALUES (?, ?, ?, ?, ?)",
                                [upload, p.number, p.etag, str(p.crc64), p.size])

    def drop_upload(self, upload: int) -> None:
        self._write("DELETE FROM uploads WHERE id=?", [upload])

    def owned_upload_ids(self) -> set[str]:
        return {r[0] for r in self._all("SELECT upload_id FROM uploads")}

    # -- events: the outbox (docs/architecture.md §8) ---------------------------------------

    def _emit(self, row: FileRow | None, now: float, *, kind: str | None = None) -> None:
        """Inside the transaction of a state change: one outbox row per hook that wants it.
        Only the states of EVENT_OF_STATE are events; retry_wait (a transient error, waiting
        for credentials) never is, so an outage fires nothing. `kind`: an event that is not a
        state (callback_failed)."""
        if row is None or self.router is None or (kind is None and row.state not in EVENT_OF_STATE):
            return
        kind = kind or EVENT_OF_STATE[row.state]
        stored = kind in ("uploaded", CALLBACK_FAILED)    # events about an object OSS holds
        hooks = self.router(kind, row.watch, row.path)
        if not hooks:
            return
        event_id = uuid.uuid4().hex
        payload = json.dumps({
            "id": event_id, "kind": kind, "time": now, "path": row.path, "watch": row.watch, "key": row.object_key,
            "url": row.url if stored else None, "size": row.size,
            "crc64": str(row.crc64) if stored and row.crc64 is not None else None,
            "etag": row.etag if stored else None, "state": row.state,
            "error": row.callback_detail if kind == CALLBACK_FAILED else row.error, "attempts": row.attempts,
            "callback": row.callback if stored else None})
        for hook in hooks:
            self.db.execute("INSERT INTO events (event_id, hook, kind, path, payload, next_attempt_at, created_at)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?)", [event_id, hook, kind, row.path, payload, now, now])

    def _emit_for(self, file_id: int, now: float) -> None:
        """_emit for a row by id; without hooks the row is not even read."""
        if self.router is not None:
            self._emit(self.get_by_id(file_id), now)

    def emit_event(self, file_id: int, *, now: float | None = None) -> None:
        """Record the event of a file's current state (for a state change written elsewhere:
        call it in the same `with state.transaction()` block)."""
        self._emit_for(file_id, time.time() if now is None else now)

    @contextmanager
    def transaction(self):
        """One transaction around several calls (they nest in it)."""
        with self._guard(write=True):
            outer = self._tx_thread is None
            self._tx_thread = threading.get_ident()
            try:
                yield
            finally:
                if outer:
                    self._tx_thread = None

    def events(self, state: str | None = None, *, limit: int | None = None) -> list[EventRow]:
        return [EventRow(*r) for r in self._listing(f"SELECT {_EVENT_COLS} FROM events", "id", state, limit)]

    def due_events(self, now: float, *, exclude: Iterable[int] = (), limit: int = 100) -> list[EventRow]:
        skip = list(exclude)
        marks = ",".join("?" * len(skip))
        sql = f"SELECT {_EVENT_COLS} FROM events WHERE state='pending' AND next_attempt_at <= ?"
        if skip:
            sql += f" AND id NOT IN ({marks})"
        return [EventRow(*r) for r in self._all(sql + " ORDER BY next_attempt_at, id LIMIT ?", [now, *skip, limit])]

    def event_delivered(self, row_id: int, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._write("UPDATE events SET state='delivered', attempts=attempts+1, error=NULL, delivered_at=?"
                    " WHERE id=? AND state='pending'", [now, row_id])

    def event_failed(self, row_id: int, error: str, *, next_attempt_at: float | None) -> None:
        """A failed delivery: tried again at `next_attempt_at`, or `dead` when None (past max_age)."""
        if next_attempt_at is None:
            self._write("UPDATE events SET state='dead', attempts=attempts+1, error=? WHERE id=? AND state='pending'",
                        [error, row_id])
        else:
            self._write("UPDATE events SET attempts=attempts+1, error=?, next_attempt_at=? WHERE id=? AND"
                        " state='pending'", [error, next_attempt_at, row_id])

    def retry_events(self, row_id: int | None = None, *, now: float | None = None) -> int:
        """dead -> pending (all, or one), with a fresh max_age from now. Returns how many moved."""
        now = time.time() if now is None else now
        sql = "UPDATE events SET state='pending', attempts=0, next_attempt_at=?, created_at=? WHERE state='dead'"
        params: list = [now, now]
        if row_id is not None:
            sql += " AND id=?"
            params.append(row_id)
        return self._write(sql, params).rowcount

    def event_counts(self) -> dict[str, int]:
        return {s: n for s, n in self._all("SELECT state, count(*) FROM events GROUP BY state")}

    def oldest_pending_event(self) -> float | None:
        row = self._one("SELECT min(created_at) FROM events WHERE state='pending'")
        return row[0] if row else None

    def prune_events(self, before: float) -> int:
        """Forget deliveries that succeeded before `before` (the outbox stays small)."""
        return self._write("DELETE FROM events WHERE state='delivered' AND delivered_at < ?", [before]).rowcount

    # -- meta ------------------------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE name=?", [name])
        return row[0] if row else None

    def set_meta(self, name: str, value: str | None) -> None:
        if value is None:
            self._write("DELETE FROM meta WHERE name=?", [name])
        else:
            self._write("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", [name, value])


# -- `ossyncd state check` and `state rebuild` (docs/state-recovery.md) ---------------------

# rows no code path writes: each query counts them, with what it means
_IMPOSSIBLE = [
    ("files in an unknown state", "SELECT count(*) FROM files WHERE state NOT IN ({states})"),
    ("done files without a recorded object (url, etag or crc64 missing)",
     "SELECT count(*) FROM files WHERE state='done' AND (url IS NULL OR etag IS NULL OR crc64 IS NULL)"),
    ("files with a negative size or attempt count", "SELECT count(*) FROM files WHERE size < 0 OR attempts < 0"),
]


def check_db(path: str | os.PathLike) -> dict:
    """Inspect the state DB at `path` without writing to it (safe while the daemon runs):
    the file, `PRAGMA integrity_check`, the schema against this build, rows in impossible
    states, the WAL. `problems` lists each defect with its fix; empty means healthy."""
    path = Path(path)
    wal = Path(f"{path}-wal")
    out: dict = {"path": str(path), "exists": path.exists(), "size": None, "schema": None,
                 "schema_expected": len(MIGRATIONS), "integrity": None, "wal_bytes": None,
                 "daemon_pid": State.lock_holder(path), "counts": {}, "problems": [], "notes": []}
    problems, notes = out["problems"], out["notes"]
    if path.is_dir():
        problems.append(f"state.path {path} is a directory; set state.path to a file in it")
        return out
    if not path.exists():
        notes.append("no state DB yet: the daemon creates one and uploads every file it finds")
        return out
    out["size"] = path.stat().st_size
    out["wal_bytes"] = wal.stat().st_size if wal.exists() else None
    if out["wal_bytes"] and out["daemon_pid"] is None:
        notes.append(f"{wal} holds {out['wal_bytes']} bytes of commits not yet in the DB file (normal after a "
                     "crash; the next start applies them): copy or move the DB only together with its -wal")
    where = path if _write_problem(path) else path.parent
    why = _write_problem(where)
    if why:
        problems.append(f"the daemon cannot write it: {why}; {_unwritable_fix(where)}")
    cut = _truncation(path)
    if cut:
        problems.append(f"{path} {cut}; move it aside: `ossyncd state rebuild`")
        return out
    if out["size"] == 0:
        notes.append("the DB file is empty: the daemon starts a new one and re-checks every file")
        return out
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            _check_open(conn, out)
        finally:
            conn.close()
    except sqlite3.Error as e:
        problems.append(str(state_error(path, e)))
    return out


def _check_open(conn: sqlite3.Connection, out: dict) -> None:
    problems = out["problems"]
    out["schema"] = version = conn.execute("PRAGMA user_version").fetchone()[0]
    integrity = [r[0] for r in conn.execute("PRAGMA integrity_check(20)").fetchall()]
    out["integrity"] = "ok" if integrity == ["ok"] else integrity
    if integrity != ["ok"]:
        problems.append(f"integrity_check failed ({'; '.join(integrity[:3])}); stop ossyncd and move it aside: "
                        "`ossyncd state rebuild`")
        return
    if version > len(MIGRATIONS):
        problems.append(f"schema {version} is newer than this ossyncd ({len(MIGRATIONS)}); upgrade ossyncd, "
                        "or move it aside: `ossyncd state rebuild`")
        return
    if version < len(MIGRATIONS):
        out["notes"].append(f"schema {version}: the daemon upgrades it to {len(MIGRATIONS)} at its next start")
    if version == 0:
        return
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    missing = {"files", "uploads", "parts", "meta"} - tables
    if missing:
        problems.append(f"schema {version} but tables {', '.join(sorted(missing))} are missing; move it aside: "
                        "`ossyncd state rebuild`")
        return
    out["counts"] = dict(conn.execute("SELECT state, count(*) FROM files GROUP BY state").fetchall())
    states = ",".join(f"'{s}'" for s in STATES)
    for what, sql in _IMPOSSIBLE:
        n = conn.execute(sql.format(states=states)).fetchone()[0]
        if n:
            problems.append(f"{n} {what}; move it aside: `ossyncd state rebuild`")
    orphans = conn.execute("PRAGMA foreign_key_check").fetchall()
    if orphans:
        tables_hit = sorted({r[0] for r in orphans})
        problems.append(f"{len(orphans)} rows in {', '.join(tables_hit)} point at rows that do not exist; "
                        "move it aside: `ossyncd state rebuild`")


def move_aside(path: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Rename the DB and its -wal and -shm to '<db>.damaged-<UTC time>' (+ '-wal', '-shm',
    so the moved copy still opens whole), refusing while a daemon holds it. Returns the new
    names; the next open starts a new, empty DB."""
    path = Path(path)
    pid = State.lock_holder(path)
    if pid is not None:
        raise StateError(f"state DB {path} is in use by a running ossyncd (pid {pid}); stop it first "
                         "(systemctl stop ossyncd)")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    base = path.with_name(f"{path.name}.damaged-{stamp}")
    moved = []
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            dst = Path(f"{base}{suffix}")
            try:
                os.rename(src, dst)
            except OSError as e:
                why = _write_problem(path.parent) or e.strerror
                raise StateError(f"state DB {path}: cannot move {src} aside: {why}; "
                                 f"{_unwritable_fix(path.parent)}") from None
            moved.append(dst)
    return moved
