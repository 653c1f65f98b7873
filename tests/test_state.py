"""State DB: schema, transitions, durability rules, single instance."""

import os
import stat
import subprocess
import sys

import pytest

from ossyncd.errors import StateError
from ossyncd.model import Identity, PartRow
from ossyncd.state import MIGRATIONS, State


@pytest.fixture
def state(tmp_path):
    s = State(tmp_path / "state.db")
    yield s
    s.close()


def test_db_is_private_and_wal(tmp_path, state):
    mode = stat.S_IMODE(os.stat(tmp_path / "state.db").st_mode)
    assert mode == 0o600
    assert state.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert state.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_identity_change_requeues(state):
    row, new = state.observe("/d/a", "/d", "a", Identity(10, 1, 7))
    assert new and row.state == "queued"
    state.mark_done(row.id, row.identity, url="u", etag="E", crc64=2**64 - 1, mode="simple")
    same, new = state.observe("/d/a", "/d", "a", Identity(10, 1, 7))
    assert not new and same.state == "done" and same.crc64 == 2**64 - 1
    changed, new = state.observe("/d/a", "/d", "a", Identity(11, 2, 7))
    assert new and changed.state == "queued" and changed.attempts == 0


def test_parts_and_done_in_one_transaction(state):
    row, _ = state.observe("/d/big", "/d", "big", Identity(300, 1, 1))
    up = state.begin_upload(row.id, "UPLOAD1", "big", 100, row.identity)
    state.record_part(up.id, 1, "E1", 11, 100)
    state.record_part(up.id, 2, "E2", 22, 100)
    assert sorted(state.parts(up.id)) == [1, 2]
    state.set_parts(up.id, [PartRow(2, "E2", 22, 100)])
    assert list(state.parts(up.id)) == [2]
    state.mark_done(row.id, row.identity, url="u", etag="E-3", crc64=5, mode="multipart")
    assert state.upload_for(row.id) is None
    assert state.db.execute("SELECT count(*) FROM parts").fetchone()[0] == 0


def test_verification_migration_keeps_rows_and_records_the_mode(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    for migration in MIGRATIONS[:2]:        # a DB written before the verification column
        migration(old)
    old.execute("PRAGMA user_version=2")
    old.execute("INSERT INTO files (path, state, updated_at) VALUES ('/d/old', 'done', 1.0)")
    old.commit()
    old.close()
    s = State(path)
    try:
        assert s.get("/d/old").verification is None
        row, _ = s.observe("/d/a", "/d", "a", Identity(10, 1, 7))
        assert s.mark_done(row.id, row.identity, url="u", etag="E", crc64=1, mode="simple", verification="md5")
        assert s.get("/d/a").verification == "md5"
    finally:
        s.close()


def test_due_and_requeue(state):
    a, _ = state.observe("/d/a", "/d", "a", Identity(1, 1, 1))
    b, _ = state.observe("/d/b", "/d", "b", Identity(1, 1, 2))
    state.transition(a.id, "retry_wait", error="503", next_attempt_at=100.0, count_attempt=True)
    state.transition(b.id, "failed", error="AccessDenied")
    assert [r.path for r in state.due(50.0)] == []
    assert [r.path for r in state.due(150.0)] == ["/d/a"]
    assert state.requeue() == 1
    assert state.get("/d/b").state == "queued"


def test_reader_sees_writer_commits(tmp_path, state):
    state.observe("/d/a", "/d", "a", Identity(1, 1, 1))
    reader = State(tmp_path / "state.db", readonly=True)
    assert reader.counts() == {"queued": 1}
    reader.close()


def test_second_daemon_is_refused(tmp_path, state):
    state.acquire_daemon_lock()
    assert State.lock_holder(tmp_path / "state.db") == os.getpid()
    code = ("from ossyncd.state import State\n"
            f"s = State({str(tmp_path / 'state.db')!r})\n"
            "s.acquire_daemon_lock()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "in use by another ossyncd" in r.stderr and str(os.getpid()) in r.stderr


def test_corrupt_db_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.db"
    p.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError, match="move it aside"):
        State(p)


def test_a_reader_never_sees_a_schema_between_migrations(tmp_path, monkeypatch):
    """The daemon upgrades while `status` may read: every migration commits together."""
    import sqlite3

    import ossyncd.state as state_mod
    db = tmp_path / "s.db"
    seen = []

    def peek(migration):
        def run(d):
            migration(d)
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:   # another connection, as status
                seen.append(c.execute("PRAGMA user_version").fetchone()[0])
        return run
    monkeypatch.setattr(state_mod, "MIGRATIONS", [peek(m) for m in MIGRATIONS])
    s = State(db)
    assert s.schema == len(MIGRATIONS) and seen == [0] * len(MIGRATIONS)
    s.close()
    r = State(db, readonly=True)
    assert r.schema == len(MIGRATIONS)
    r.close()
