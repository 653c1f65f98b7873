"""Which version of a file is it: times beyond SQLite's INTEGER, and rewrites that restore the mtime."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from contextlib import closing

import pytest
import sqlite_utils

from ossyncd.model import Identity
from ossyncd.state import MIGRATIONS, State
from tests.helpers import events, object_bytes, random_file, scrape, wait_until


def puts(emulator) -> int:
    return emulator.stats()["requests"].get("PutObject", 0)


def test_identity_clamps_times_beyond_int64(tmp_path):
    f = tmp_path / "x.jpg"
    f.write_bytes(b"x")
    subprocess.run(["touch", "-d", "2300-01-01", str(f)], check=True)
    st = os.stat(f)
    assert st.st_mtime_ns > 2**63 - 1            # the case SQLite cannot store
    i = Identity.of(st)
    assert i.mtime_ns == 2**63 - 1 and i == Identity.of(os.stat(f))
    assert Identity(1, 2, 3, None).matches(Identity(1, 2, 3, 4))
    assert not Identity(1, 2, 3, 5).matches(Identity(1, 2, 3, 4))


@pytest.mark.timeout(120)
def test_far_future_mtime_uploads_and_every_watch_keeps_working(tmp_path, emulator, daemon_factory):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    d = daemon_factory([{"path": str(a), "prefix": "a/", "settle_seconds": 0.3},
                        {"path": str(b), "prefix": "b/", "settle_seconds": 0.3}]).start()
    future = random_file(tmp_path / "x.jpg", 3000, seed=1)
    subprocess.run(["touch", "-d", "2300-01-01", str(tmp_path / "x.jpg")], check=True)
    os.rename(tmp_path / "x.jpg", a / "x.jpg")
    d.wait_states({"done": 1}, 30)
    later = {"a/later.txt": random_file(a / "later.txt", 100, seed=2),
             "b/other.txt": random_file(b / "other.txt", 200, seed=3)}
    d.wait_states({"done": 3, "failed": 0}, 30)
    assert object_bytes(emulator, "a/x.jpg") == future
    for key, data in later.items():
        assert object_bytes(emulator, key) == data
    # a restart rescans the file: same identity, not uploaded again, and new files still flow
    assert d.stop() == 0
    sent, scans = puts(emulator), len(events(d, "rescan"))
    d.start()
    wait_until(lambda: len(events(d, "rescan")) >= scans + 2, 30, what="the startup rescan of both watches")
    fresh = random_file(b / "fresh.txt", 300, seed=4)
    d.wait_states({"done": 4, "failed": 0}, 30)
    assert object_bytes(emulator, "b/fresh.txt") == fresh
    assert puts(emulator) == sent + 1
    assert d.stop() == 0


def _cp_p_same_size_same_mtime(tmp_path, target, data: bytes) -> None:
    """`cp -p` of other bytes with the target's own mtime: size, mtime and inode stay."""
    src = tmp_path / "new-version"
    src.write_bytes(data)
    st = os.stat(target)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    subprocess.run(["cp", "-p", str(src), str(target)], check=True)
    after = os.stat(target)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


@pytest.mark.timeout(120)
def test_same_size_rewrite_with_mtime_restored_is_uploaded(tmp_path, emulator, daemon_factory):
    drop = tmp_path / "drop"
    drop.mkdir()
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}]).start()
    old = random_file(drop / "build.bin", 5000, seed=1)
    d.wait_states({"done": 1}, 30)
    assert object_bytes(emulator, "build.bin") == old
    new = random_file(tmp_path / "unused", 5000, seed=2)
    _cp_p_same_size_same_mtime(tmp_path, drop / "build.bin", new)
    wait_until(lambda: object_bytes(emulator, "build.bin") == new, 30, interval=0.2, what="the rewrite uploaded")
    d.wait_states({"done": 1, "failed": 0}, 30)
    assert puts(emulator) == 2
    assert d.stop() == 0


@pytest.mark.timeout(120)
def test_chmod_or_touch_r_of_a_done_file_sends_nothing(tmp_path, emulator, daemon_factory):
    drop = tmp_path / "drop"
    drop.mkdir()
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}],
                       metrics={"listen": "127.0.0.1:0"}).start()
    data = random_file(drop / "photo.jpg", 4000, seed=1)
    d.wait_states({"done": 1}, 30)
    os.chmod(drop / "photo.jpg", 0o600)
    wait_until(lambda: events(d, "unchanged; only its ctime moved, the object already holds these bytes"), 30,
               what="the CRC64 comparison after chmod")
    subprocess.run(["touch", "-r", str(drop / "photo.jpg"), str(drop / "photo.jpg")], check=True)
    wait_until(lambda: len(events(d, "unchanged; only its ctime moved, the object already holds these bytes")) == 2,
               30, what="the CRC64 comparison after touch -r")
    d.wait_states({"done": 1, "queued": 0, "failed": 0}, 30)
    assert puts(emulator) == 1
    assert object_bytes(emulator, "photo.jpg") == data
    row = d.files()[0]
    assert row["state"] == "done" and row["error"] is None
    metrics = scrape(wait_until(lambda: events(d, "metrics listening"), 10, what="metrics")[0]["url"])
    assert metrics["ossyncd_uploads_completed_total"] == 1   # the CRC checks sent nothing
    assert d.stop() == 0


def test_upgrade_leaves_ctime_unknown_and_compares_by_crc(tmp_path):
    """Rows from before the ctime migration: a done file is CRC-checked, not re-uploaded; a
    pending one just learns its ctime."""
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    old = sqlite_utils.Database(conn)
    for n, migration in enumerate(MIGRATIONS[:2], start=1):
        migration(old)
        old.execute(f"PRAGMA user_version={n}")
    conn.execute("INSERT INTO files (path, watch, key, size, mtime_ns, inode, state, crc64, updated_at)"
                 " VALUES ('/d/done', '/d', 'done', 10, 1, 7, 'done', '42', 0),"
                 " ('/d/wait', '/d', 'wait', 10, 1, 8, 'failed', NULL, 0)")
    conn.commit()
    conn.close()
    state = State(db)
    try:
        done = state.get("/d/done")
        assert done.ctime_ns is None and done.state == "done"
        row, new = state.observe("/d/done", "/d", "done", Identity(10, 1, 7, 99))
        assert new and row.state == "queued" and row.check_crc == 1 and row.crc64 == 42
        assert state.mark_unchanged(row.id, row.identity)
        assert state.get("/d/done").state == "done" and state.get("/d/done").ctime_ns == 99
        row, new = state.observe("/d/wait", "/d", "wait", Identity(10, 1, 8, 5))
        assert not new and row.state == "failed" and row.ctime_ns == 5
        row, new = state.observe("/d/wait", "/d", "wait", Identity(10, 1, 8, 6))   # known ctime moved
        assert new and row.state == "queued" and row.check_crc == 0
    finally:
        state.close()


@pytest.mark.timeout(120)
def test_rows_from_before_the_ctime_migration_are_not_re_uploaded(tmp_path, emulator, daemon_factory):
    drop = tmp_path / "drop"
    drop.mkdir()
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}], daemon={"rescan_interval": 1.0})
    d.start()
    data = {f"f{i}.bin": random_file(drop / f"f{i}.bin", 2000 + i, seed=i) for i in range(3)}
    d.wait_states({"done": 3}, 30)
    assert d.stop() == 0
    with closing(sqlite3.connect(d.db)) as conn:   # what the migration leaves on rows recorded before it
        conn.execute("UPDATE files SET ctime_ns = NULL")
        conn.commit()
    d.start()
    wait_until(lambda: len(events(d, "unchanged; only its ctime moved, the object already holds these bytes")) == 3,
               30, what="each upgraded row compared by CRC64")
    d.wait_states({"done": 3, "queued": 0, "failed": 0}, 30)
    assert puts(emulator) == 3
    assert all(object_bytes(emulator, k) == v for k, v in data.items())
    with closing(sqlite3.connect(d.db)) as conn:
        assert conn.execute("SELECT count(*) FROM files WHERE ctime_ns IS NULL").fetchone()[0] == 0
    assert d.stop() == 0
