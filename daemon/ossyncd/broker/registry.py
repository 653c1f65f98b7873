"""The broker's own SQLite file: registered clients (the SHA-256 of each token, never the
token), the latest heartbeat per client and host, and per-client issue metadata.

One connection behind a lock (each call is a short indexed read or write), WAL, no cache: the
CLI's add/disable/remove in another process are seen by the very next request (revocation
is immediate)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ossyncd.errors import CommandFailed, StateError

NAME_RE = re.compile(r"^[A-Za-z0-9.@_-]{2,64}$")   # it becomes the STS RoleSessionName
PREFIX_RE = re.compile(r"^[^*?\x00-\x1f/][^*?\x00-\x1f]*/$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    bucket TEXT NOT NULL,
    prefixes TEXT NOT NULL,              -- JSON list
    max_duration INTEGER,                -- NULL: the broker's max_duration
    role_arn TEXT,                       -- NULL: broker.role_arn
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    token_rotated_at REAL,
    last_issued_at REAL,
    last_expiry REAL,
    last_key_id TEXT                     -- masked
);
CREATE TABLE IF NOT EXISTS heartbeats (
    client TEXT NOT NULL,
    host TEXT NOT NULL,
    received_at REAL NOT NULL,
    remote TEXT,
    body TEXT NOT NULL,                  -- the JSON the host sent
    PRIMARY KEY (client, host)
);
"""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Client:
    name: str
    bucket: str
    prefixes: tuple[str, ...]
    max_duration: int | None
    role_arn: str | None
    disabled: bool
    created_at: float
    last_issued_at: float | None = None
    last_expiry: float | None = None
    last_key_id: str | None = None


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise CommandFailed("client", f"{name!r} is not a valid client name: it becomes the STS RoleSessionName, "
                                      "so use 2-64 characters from A-Z a-z 0-9 . @ _ -", exit_code=2)
    return name


def check_prefix(prefix: str) -> str:
    if not PREFIX_RE.match(prefix) or any(seg in ("", ".", "..") for seg in prefix[:-1].split("/")):
        raise CommandFailed("--prefix", f"{prefix!r} is not a folder prefix: write it like \"site1/cam2/\" (ending "
                                        "in '/', so site1/ never grants site10/; no leading '/', no '*' or '?', "
                                        "no empty, '.' or '..' segments)", exit_code=2)
    return prefix


class Registry:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
        except OSError as e:
            raise StateError(f"broker.state: cannot open {self.path}: {e.strerror}; check the directory "
                             "exists and the broker's user may write it", clearable=True) from None
        try:
            with self._lock:
                self._db().executescript(SCHEMA)   # CREATE IF NOT EXISTS: safe from every process
        except sqlite3.Error as e:
            raise self._error(e) from None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._conn = db
        return self._conn

    class _Tx:
        def __init__(self, reg: "Registry"):
            self.reg = reg

        def __enter__(self) -> sqlite3.Connection:
            self.reg._lock.acquire()
            try:
                self.db = self.reg._db()
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                self.reg._lock.release()
                raise self.reg._error(e) from None
            return self.db

        def __exit__(self, exc_type, exc, tb):
            try:
                self.db.execute("ROLLBACK" if exc_type else "COMMIT")
            except sqlite3.Error as e:
                if exc_type is None:
                    raise self.reg._error(e) from None
            finally:
                self.reg._lock.release()
            if isinstance(exc, sqlite3.Error):
                raise self.reg._error(exc) from None
            return False

    def _tx(self) -> "Registry._Tx":
        return Registry._Tx(self)

    def _error(self, e: sqlite3.Error) -> StateError:
        return StateError(f"broker registry {self.path}: {e}; check the file and its directory", clearable=True)

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        try:
            with self._lock:
                return self._db().execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise self._error(e) from None

    # ----- health
    def check(self) -> int:
        """The number of clients; StateError when the file cannot be read."""
        return int(self._read("SELECT count(*) FROM clients")[0][0])

    # ----- clients
    @staticmethod
    def _client(r: sqlite3.Row) -> Client:
        return Client(r["name"], r["bucket"], tuple(json.loads(r["prefixes"])), r["max_duration"], r["role_arn"],
                      bool(r["disabled"]), r["created_at"], r["last_issued_at"], r["last_expiry"], r["last_key_id"])

    def by_token(self, token: str) -> Client | None:
        rows = self._read("SELECT * FROM clients WHERE token_sha256 = ?", (token_hash(token),))
        return self._client(rows[0]) if rows else None

    def get(self, name: str) -> Client | None:
        rows = self._read("SELECT * FROM clients WHERE name = ?", (name,))
        return self._client(rows[0]) if rows else None

    def clients(self) -> list[Client]:
        return [self._client(r) for r in self._read("SELECT * FROM clients ORDER BY name")]

    def add(self, name: str, bucket: str, prefixes: list[str], max_duration: int | None, role_arn: str | None) -> str:
        """Register a client; returns its token (shown once, stored only as a hash)."""
        token = secrets.token_urlsafe(32)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM clients WHERE name = ?", (name,)).fetchone():
                raise CommandFailed(f"client {name}", "already registered; use `ossyncd broker rotate-token` for a "
                                                      "new token or remove-client first")
            db.execute("INSERT INTO clients (name, token_sha256, bucket, prefixes, max_duration, role_arn, created_at)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (name, token_hash(token), bucket, json.dumps(prefixes), max_duration, role_arn, time.time()))
        return token

    def _update(self, name: str, sql: str, args: tuple = ()) -> None:
        with self._tx() as db:
            if db.execute(f"UPDATE clients SET {sql} WHERE name = ?", (*args, name)).rowcount == 0:
                raise CommandFailed(f"client {name}", "not registered; see `ossyncd broker list-clients`")

    def set_disabled(self, name: str, disabled: bool) -> None:
        self._update(name, "disabled = ?", (int(disabled),))

    def rotate(self, name: str) -> str:
        token = secrets.token_urlsafe(32)
        self._update(name, "token_sha256 = ?, token_rotated_at = ?", (token_hash(token), time.time()))
        return token

    def remove(self, name: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM clients WHERE name = ?", (name,)).rowcount == 0:
                raise CommandFailed(f"client {name}", "not registered; see `ossyncd broker list-clients`")
            db.execute("DELETE FROM heartbeats WHERE client = ?", (name,))

    def record_issue(self, name: str, at: float, expiry: float | None, masked_key_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE clients SET last_issued_at = ?, last_expiry = ?, last_key_id = ? WHERE name = ?",
                       (at, expiry, masked_key_id, name))

    # ----- heartbeats
    def heartbeat(self, client: str, host: str, body: dict, remote: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO heartbeats (client, host, received_at, remote, body) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT (client, host) DO UPDATE SET received_at = excluded.received_at, "
                       "remote = excluded.remote, body = excluded.body",
                       (client, host, time.time(), remote, json.dumps(body)))

    def heartbeats(self) -> list[dict]:
        return [{"client": r["client"], "host": r["host"], "received_at": r["received_at"], "remote": r["remote"],
                 "body": json.loads(r["body"])}
                for r in self._read("SELECT * FROM heartbeats ORDER BY client, host")]
