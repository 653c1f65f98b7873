"""The state DB never fails quietly: disk full (backoff, shown in `status`, recovery), a
corrupt page or a deleted DB under the running daemon (one log line, exit non-zero), a
state.path that is a directory or lies on a read-only mount (a message naming the path and
the fix), and the single-writer lock (symlinked DB path, `ossyncd upload`)."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from ossyncd.errors import StateError
from ossyncd.model import Identity
from ossyncd.state import State
from tests.helpers import Daemon, events, fast_upload, object_bytes, ossyncd, random_file, wait_until, write_config

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def mounts():
    """mount(*args): run mount(8), skipping the test if mounting is not permitted here;
    everything mounted is unmounted at teardown, innermost first."""
    done: list[Path] = []

    def mount(*args: str) -> None:
        r = subprocess.run(["mount", *args], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"mount {' '.join(args)} is not permitted here: {r.stderr.strip()}")
        if not any("remount" in a for a in args):   # a remount is undone with its mount
            done.append(Path(args[-1]))
    yield mount
    for target in reversed(done):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def readonly_bind(mount, directory: Path) -> None:
    mount("--bind", str(directory), str(directory))
    mount("-o", "remount,bind,ro", str(directory))


def fill(directory: Path) -> Path:
    """Write a filler file until the file system is full."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


def on_db(daemon_factory, emu, db: Path, watches: list[dict]) -> Daemon:
    """A daemon from the factory whose state DB lives at `db`."""
    d = daemon_factory(watches)
    d.db = db
    write_config(d.config, emu, state=db, upload=fast_upload(), daemon={"rescan_interval": 5.0}, watches=watches)
    return d


# ------------------------------------------------------------------------ disk full

def test_disk_full_is_shown_retried_and_recovers(tmp_path, emulator, daemon_factory, mounts):
    small = tmp_path / "small"
    small.mkdir()
    mounts("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small))
    drop = tmp_path / "drop"
    drop.mkdir()
    d = on_db(daemon_factory, emulator, small / "state.db", [{"path": str(drop), "prefix": "", "settle_seconds": 0.3}])
    d.start()
    wait_until(lambda: events(d, "started"), 30, what="daemon started")
    filler = fill(small)
    data = {f"f{i}.txt": random_file(drop / f"f{i}.txt", 1000 + i, seed=i) for i in range(20)}

    def stuck():
        s = d.status()
        return s["daemon"]["state_error"] and s
    s = wait_until(stuck, 30, interval=0.3, what="status shows the state error")
    assert "disk full" in s["daemon"]["state_error"] and str(small) in s["daemon"]["state_error"]
    r = ossyncd("status", "-c", d.config)
    assert r.returncode == 0 and "state error:" in r.stdout and "disk full" in r.stdout, r.stdout
    # nothing is recorded done that is not in the bucket with its bytes
    for f in d.files("done"):
        assert object_bytes(emulator, f["key"]) == data[f["key"]]
    wait_until(lambda: d.status()["daemon"]["state_retries"] >= 3, 30, interval=0.3,
               what="the loop retrying with backoff")
    assert len(events(d, "state DB unusable; uploads wait")) == 1, d.output()[-3000:]   # no flood
    assert d.proc.poll() is None, d.output()[-3000:]

    filler.unlink()
    freed = wait_until(lambda: events(d, "state DB usable again; uploads continue"), 35,
                       what="recovery within one backoff interval (<= 30 s)")
    assert freed and len(events(d, "state DB unusable; uploads wait")) == 1
    d.wait_states({"done": len(data)}, 60)
    for name, body in data.items():
        assert object_bytes(emulator, name) == body
    assert d.status()["daemon"]["state_error"] is None
    assert d.stop() == 0
    r = ossyncd("state", "check", "-c", d.config)      # the DB stayed intact through the full disk
    assert r.returncode == 0 and "integrity_check: ok" in r.stdout, r.stdout


# ------------------------------------------------------------------------ fatal: corrupt, deleted

def started_with_one_done(daemon_factory, tmp_path, emulator) -> Daemon:
    drop = tmp_path / "drop"
    drop.mkdir()
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}])
    d.start()
    body = random_file(drop / "a.txt", 3000, seed=1)
    d.wait_states({"done": 1}, 30)
    assert object_bytes(emulator, "a.txt") == body
    return d


def fatal_lines(d: Daemon) -> list[dict]:
    return events(d, "state DB unusable; exiting so that systemd restarts ossyncd")


def test_corrupt_page_under_the_running_daemon_exits_nonzero(tmp_path, emulator, daemon_factory):
    d = started_with_one_done(daemon_factory, tmp_path, emulator)
    db = sqlite3.connect(str(d.db), timeout=10, isolation_level=None)
    # every page now lives in the DB file (busy = 0: the checkpoint was complete)
    wait_until(lambda: db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0, 20,
               what="a complete checkpoint")
    page = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    size = d.db.stat().st_size
    with open(d.db, "r+b") as f:                       # zero every page but the header page
        f.seek(page)
        f.write(b"\0" * (size - page))
    db = sqlite3.connect(str(d.db), timeout=10, isolation_level=None)
    db.execute("PRAGMA user_version=2")                # a commit: the daemon drops its page cache
    db.close()

    for args in (["status"], ["status", "--json"], ["list"]):   # no traceback, one exit code
        r = ossyncd(*args, "-c", d.config)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "state error:" in r.stderr and str(d.db) in r.stderr and "move it aside" in r.stderr, r.stderr
    assert d.proc.wait(30) == 1, d.output()[-3000:]
    lines = fatal_lines(d)
    assert len(lines) == 1 and lines[0]["level"] == "error", d.output()[-3000:]
    assert "malformed" in lines[0]["error"] and str(d.db) in lines[0]["error"]
    assert "move it aside" in lines[0]["error"]
    assert "Traceback" not in d.output()


def test_state_db_deleted_while_running_exits_nonzero(tmp_path, emulator, daemon_factory):
    d = started_with_one_done(daemon_factory, tmp_path, emulator)
    d.db.unlink()
    assert d.proc.wait(30) == 1, d.output()[-3000:]
    lines = fatal_lines(d)
    assert len(lines) == 1 and str(d.db) in lines[0]["error"], d.output()[-3000:]
    assert "deleted" in lines[0]["error"] and "restart" in lines[0]["error"]


# ------------------------------------------------------------------------ state.path problems at start

def assert_state_message(r, *needles: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "state error:" in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_state_path_that_is_a_directory(tmp_path, emulator, daemon_factory):
    drop = tmp_path / "drop"
    drop.mkdir()
    target = tmp_path / "statedir"
    target.mkdir()
    d = on_db(daemon_factory, emulator, target, [{"path": str(drop), "prefix": ""}])
    for args in (["run"], ["status"], ["list"]):
        r = ossyncd(*args, "-c", d.config, timeout=60)
        assert_state_message(r, f"state.path {target} is a directory", str(target / "state.db"))


def test_unwritable_state_directory(tmp_path, emulator, daemon_factory, mounts):
    drop = tmp_path / "drop"
    drop.mkdir()
    sdir = tmp_path / "var"
    sdir.mkdir()
    readonly_bind(mounts, sdir)
    d = on_db(daemon_factory, emulator, sdir / "state.db", [{"path": str(drop), "prefix": ""}])
    r = ossyncd("run", "-c", d.config, timeout=60)
    assert_state_message(r, str(sdir / "state.db"), f"read-only file system on {sdir}", "write access")
    assert "move it aside" not in r.stderr


def test_read_only_state_directory_names_the_cause_not_corruption(tmp_path, emulator, daemon_factory, mounts):
    """The DB file itself is writable, its directory is not (no -wal/-shm can be made there):
    the advice must be about the directory, never to move the (healthy) DB aside."""
    drop = tmp_path / "drop"
    drop.mkdir()
    real = tmp_path / "real.db"
    State(real).close()
    sdir = tmp_path / "var"
    sdir.mkdir()
    (sdir / "state.db").touch()
    readonly_bind(mounts, sdir)
    mounts("--bind", str(real), str(sdir / "state.db"))
    d = on_db(daemon_factory, emulator, sdir / "state.db", [{"path": str(drop), "prefix": ""}])
    for args in (["run"], ["status"]):
        r = ossyncd(*args, "-c", d.config, timeout=60)
        assert_state_message(r, str(sdir / "state.db"), f"read-only file system on {sdir}", "ReadWritePaths")
        assert "move it aside" not in r.stderr and "corrupt" not in r.stderr


# ------------------------------------------------------------------------ one writer per DB

def test_symlinked_state_path_meets_the_same_lock(tmp_path, emulator, daemon_factory):
    drop = tmp_path / "drop"
    drop.mkdir()
    first = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}])
    first.start()
    wait_until(lambda: events(first, "started"), 30, what="first daemon started")
    link = tmp_path / "alias.db"
    link.symlink_to(first.db)
    second = Daemon(tmp_path, emulator, [{"path": str(drop), "prefix": "", "settle_seconds": 0.3}],
                    name="second", upload=fast_upload())
    write_config(second.config, emulator, state=link, upload=fast_upload(),
                 watches=[{"path": str(drop), "prefix": "", "settle_seconds": 0.3}])
    r = ossyncd("run", "-c", second.config, timeout=60)
    assert_state_message(r, "in use by another ossyncd", f"pid {first.proc.pid}")
    assert first.proc.poll() is None
    assert first.stop() == 0


def test_upload_refuses_while_the_daemon_holds_the_db(tmp_path, emulator, daemon_factory):
    drop = tmp_path / "drop"
    drop.mkdir()
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}])
    d.start()
    wait_until(lambda: events(d, "started"), 30, what="daemon started")
    outside = tmp_path / "outside.bin"
    random_file(outside, 5000, seed=4)
    r = ossyncd("upload", "-c", d.config, outside, timeout=60)
    assert_state_message(r, "in use by another ossyncd", f"pid {d.proc.pid}", "watch folder", "stop it")
    assert not any(f["path"] == str(outside) for f in d.files())
    assert d.stop() == 0
    r = ossyncd("upload", "-c", d.config, outside, timeout=60)     # no daemon: it uploads
    assert r.returncode == 0, r.stderr
    assert object_bytes(emulator, "outside.bin") == outside.read_bytes()


# ------------------------------------------------------------------------ closed DB, stale heartbeat

def test_a_closed_state_refuses_every_call(tmp_path):
    """Shutdown closes the DB while abandoned workers may still return: nothing may be written."""
    s = State(tmp_path / "state.db")
    row, _ = s.observe("/d/a", "/d", "a", Identity(1, 1, 1))
    s.close()
    calls = [lambda: s.observe("/d/b", "/d", "b", Identity(1, 1, 2)), lambda: s.transition(row.id, "failed"),
             lambda: s.mark_done(row.id, row.identity, url="u", etag="e", crc64=1, mode="simple"),
             lambda: s.begin_upload(row.id, "U", "a", 100, row.identity), lambda: s.counts(),
             lambda: s.set_meta("paused", "1")]
    for call in calls:
        with pytest.raises(StateError, match="is closed"):
            call()
    assert State(tmp_path / "state.db", readonly=True).get("/d/a").state == "queued"


def test_status_shows_a_running_daemon_whose_loop_stopped_ticking(tmp_path, emulator):
    """The lock is held (by this process, standing in for the daemon) but the heartbeat in the
    health file is old: `status` says the loop is stuck, and shows its last state error."""
    cfg = write_config(tmp_path / "c.toml", emulator, state=tmp_path / "state.db",
                       watches=[{"path": str(tmp_path), "prefix": ""}])
    s = State(tmp_path / "state.db")
    s.acquire_daemon_lock()
    s.open_health()
    s.write_health({"heartbeat_at": time.time() - 600, "state_error": "state DB x: disk full; free space on y"})
    try:
        r = ossyncd("status", "-c", cfg, "--json")
        assert r.returncode == 0, r.stderr
        dm = json.loads(r.stdout)["daemon"]
        assert dm["running"] and dm["pid"] == os.getpid() and dm["stuck"] and dm["heartbeat_age_s"] >= 600
        assert dm["state_error"] == "state DB x: disk full; free space on y"
        r = ossyncd("status", "-c", cfg)
        assert "has not ticked for" in r.stdout and "disk full" in r.stdout, r.stdout
    finally:
        s.close()


def test_metrics_scrape_survives_an_unreadable_state_db(tmp_path):
    """The scrape runs on the endpoint's thread: a state error drops the state gauges only."""
    from prometheus_client import generate_latest

    from ossyncd.metrics import Metrics
    s = State(tmp_path / "state.db")
    m = Metrics()
    m.bind(s, None)
    assert b"ossyncd_queue_depth" in generate_latest(m.registry)
    s.close()                                  # every read now raises StateError
    text = generate_latest(m.registry)
    assert b"ossyncd_uploads_completed_total" in text and b"ossyncd_queue_depth" not in text
