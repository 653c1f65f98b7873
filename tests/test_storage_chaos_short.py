"""The state DB under damage, power loss, a full disk and host limits: the short versions in
`make test` of the chaos suite's storage scenarios (tests/chaos/test_storage.py runs them at
scale). Each runs the daemon as a subprocess against the emulator. The helpers here (a
damaged DB, a power-loss snapshot, the false-`done` check) serve both files."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import oss2
import pytest
import sqlite_utils

from ossyncd.model import Identity
from ossyncd.state import MIGRATIONS, State
from tests import test_state_errors as state_errors
from tests.helpers import (
    Daemon,
    MiB,
    events,
    fast_upload,
    json_lines,
    object_bytes,
    ossyncd,
    random_file,
    root_bucket,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.timeout(120)

WAL_HEADER, FRAME_HEADER = 32, 24


# ------------------------------------------------------------------------ helpers

def damage(db: Path, kind: str) -> None:
    """Damage the (stopped daemon's) state DB at `db` the way `kind` says."""
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    if kind == "truncated":
        data = db.read_bytes()
        db.write_bytes(data[:len(data) // 2])
    elif kind == "garbage":
        db.write_bytes(random.Random(7).randbytes(db.stat().st_size))
    elif kind == "future":
        c = sqlite3.connect(str(db))
        c.execute("PRAGMA user_version=999")
        c.commit()
        c.close()
    else:
        raise ValueError(kind)


def integrity(db: Path) -> str:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return ";".join(r[0] for r in c.execute("PRAGMA integrity_check"))
    finally:
        c.close()


def _backfilled_frames(shm: Path) -> int:
    """Frames a checkpoint may already have copied into the DB file (nBackfillAttempted in the
    wal-index, sqlite3 walCheckpoint): they were fsynced before it, so a power loss keeps them."""
    try:
        with open(shm, "rb") as f:
            head = f.read(136)
    except FileNotFoundError:
        return 0
    if len(head) < 136:
        return 0
    mx_frame = int.from_bytes(head[16:20], sys.byteorder)
    attempted = int.from_bytes(head[128:132], sys.byteorder)
    return min(mx_frame, attempted) if attempted else 0


def power_loss_copy(pid: int, db: Path, dest: Path, rng: random.Random) -> dict:
    """What a power loss at this moment could leave: the daemon frozen (SIGSTOP), its DB file
    copied, and its WAL copied up to a random cut that keeps every frame a checkpoint may
    have used (frames after the last fsync may be lost; SQLite's checksums drop a torn tail).
    The -shm is copied too; the first opener rebuilds it from the WAL."""
    os.kill(pid, signal.SIGSTOP)
    try:
        shutil.copyfile(db, dest)
        wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
        kept, size = None, None
        if wal.exists():
            data = wal.read_bytes()
            size = len(data)
            page = sqlite3_page_size(db)
            floor = WAL_HEADER + _backfilled_frames(shm) * (FRAME_HEADER + page) if size >= WAL_HEADER else 0
            kept = size if rng.random() < 0.4 or size <= floor else rng.randint(floor, size)
            Path(f"{dest}-wal").write_bytes(data[:kept])
        if shm.exists():
            shutil.copyfile(shm, f"{dest}-shm")
    finally:
        os.kill(pid, signal.SIGCONT)
    return {"wal_bytes": size, "wal_kept": kept}


def sqlite3_page_size(db: Path) -> int:
    with open(db, "rb") as f:
        head = f.read(18)
    n = int.from_bytes(head[16:18], "big") if len(head) == 18 else 4096
    return 65536 if n == 1 else (n or 4096)


def copy_config(d: Daemon, db: Path, name: str) -> Path:
    """A config like `d`'s, on the state DB `db`."""
    cfg = d.config.with_name(f"{name}.toml")
    text = d.config.read_text().replace(json.dumps(str(d.db)), json.dumps(str(db)))
    cfg.write_text(text)
    os.chmod(cfg, 0o600)
    return cfg


def false_done(emu, db: Path, *, live: bool = False) -> list:
    """`done` rows of the state DB at `db`, opened as the daemon opens it (WAL applied, schema
    migrated; `live`: read-only, a running daemon's DB), whose object is not in the bucket with
    the row's CRC-64, unless the file has moved on since (a later version then replaced that
    object: the row is stale, not false, and the daemon's rescan re-uploads it)."""
    state = State(db, readonly=live)
    try:
        rows = state.files("done")
    finally:
        state.close()
    bucket = root_bucket(emu)
    bad = []
    for row in rows:
        try:
            crc = bucket.head_object(row.key).headers.get("x-oss-hash-crc64ecma")
        except oss2.exceptions.NotFound:   # the worst case: a `done` without its object
            crc = None
        if crc == str(row.crc64):
            continue
        try:
            moved_on = Identity.of(os.stat(row.path)) != row.identity
        except FileNotFoundError:
            moved_on = True
        if crc is None or not moved_on:
            bad.append((row.path, row.key, row.crc64, crc))
    return bad


def done_rows(db: Path) -> int:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return c.execute("SELECT count(*) FROM files WHERE state='done'").fetchone()[0]
    finally:
        c.close()


def workload(drop: Path, rng: random.Random, n: int, *, big: int = 2 * MiB) -> dict[str, bytes]:
    """A small mix: empty, small and multipart files (fast_upload: 1 MiB threshold)."""
    out = {}
    for i in range(n):
        size = rng.choice([0, rng.randint(1, 50_000), rng.randint(MiB + 1, big)])
        out[f"w/f{i}.bin"] = random_file(drop / "w" / f"f{i}.bin", size, seed=rng.randrange(1 << 30))
    return out


def converged(d: Daemon, expected: dict[str, bytes], timeout: float) -> None:
    """Every expected key done and byte-equal, nothing else pending, the DB intact."""
    d.wait_states({"done": len(expected), "queued": 0, "uploading": 0, "retry_wait": 0, "failed": 0}, timeout)
    for key, data in expected.items():
        assert object_bytes(d.emu, key) == data, key
    assert integrity(d.db) == "ok"
    assert not list(root_bucket(d.emu).list_multipart_uploads().upload_list) or wait_until(
        lambda: not root_bucket(d.emu).list_multipart_uploads().upload_list, 30, interval=0.5,
        what="no multipart upload left open")


def state_cli(config: Path, *args: str):
    return ossyncd("state", "check", *args, "-c", config, timeout=60)


mounts = state_errors.mounts   # the fixture: mount(*args), unmounted at teardown


# ------------------------------------------------------------------------ damaged DB

def healthy_checks(d: Daemon, tmp_path: Path, expected: dict) -> None:
    """`state check` under the running daemon: ok, read-only; `rebuild` refuses while it runs,
    and for a healthy DB without --force; an impossible row is found."""
    c = state_cli(d.config, "--json")
    assert c.returncode == 0, c.stdout + c.stderr
    report = json.loads(c.stdout)
    assert report["integrity"] == "ok" and report["daemon_pid"] == d.proc.pid and report["problems"] == []
    assert report["counts"]["done"] == len(expected) and report["wal_bytes"] is not None
    assert d.status()["watches"][0]["events"] == "inotify"
    r = ossyncd("state", "rebuild", "--force", "-c", d.config)
    assert r.returncode == 1 and f"pid {d.proc.pid}" in r.stderr and d.db.exists(), r.stderr
    assert d.stop() == 0
    r = ossyncd("state", "rebuild", "-c", d.config)             # healthy: only with --force
    assert r.returncode == 1 and "--force" in r.stderr and not list(tmp_path.glob("state.db.damaged-*"))
    c = sqlite3.connect(str(d.db))                              # an impossible row: `done` recording no object
    c.execute("UPDATE files SET crc64=NULL WHERE id=(SELECT min(id) FROM files WHERE state='done')")
    c.commit()
    c.close()
    r = state_cli(d.config)
    assert r.returncode == 1 and "1 done files without a recorded object" in r.stdout, r.stdout


def read_only_refused(d: Daemon, mounts) -> None:
    """The DB file on a read-only mount: refused naming the file and the fix, never "move it aside"."""
    mounts("--bind", str(d.db), str(d.db))
    mounts("-o", "remount,bind,ro", str(d.db))
    try:
        r = ossyncd("run", "-c", d.config, timeout=60)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"read-only file system on {d.db}" in r.stderr and f"write access to {d.db}" in r.stderr, r.stderr
        assert "move it aside" not in r.stderr and "rebuild" not in r.stderr   # the DB is healthy
        c = state_cli(d.config)
        assert c.returncode == 1 and "cannot write" in c.stdout and "integrity_check: ok" in c.stdout, c.stdout
    finally:
        subprocess.run(["umount", str(d.db)], capture_output=True)


def test_state_db_damage_is_refused_with_the_fix_checked_and_rebuilt(tmp_path, emulator, daemon_factory, mounts):
    """`state check` under the running daemon; a read-only DB file; then truncated, garbage and
    a future schema: `run` refuses once (exit 1, the file and the fix, no traceback),
    `status` and `state check` say so, `state rebuild` moves it aside, and the daemon's rescan
    brings every file back to `done`."""
    drop = tmp_path / "drop"
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}])
    expected = workload(drop, random.Random(1), 4, big=MiB + 100_000)
    d.start()
    d.wait_states({"done": len(expected)}, 60)
    healthy_checks(d, tmp_path, expected)
    good = d.db.read_bytes()                                   # stopped: no WAL, whole (one row now damaged)
    read_only_refused(d, mounts)
    for kind in ("truncated", "garbage", "future"):
        d.db.write_bytes(good)
        damage(d.db, kind)
        r = ossyncd("run", "-c", d.config, timeout=60)          # one refusal, not a loop of tracebacks
        assert r.returncode == 1 and "Traceback" not in r.stderr, (kind, r.stderr)
        assert str(d.db) in r.stderr and "ossyncd state rebuild" in r.stderr, (kind, r.stderr)
        assert ("upgrade ossyncd" in r.stderr) == (kind == "future"), (kind, r.stderr)
        if kind == "truncated":
            s = ossyncd("status", "-c", d.config)
            assert s.returncode == 1 and "state error:" in s.stderr and str(d.db) in s.stderr, s.stderr
        c = state_cli(d.config, "--json")
        assert c.returncode == 1, (kind, c.stdout + c.stderr)
        problems = json.loads(c.stdout)["problems"]
        assert problems and all("ossyncd state rebuild" in p for p in problems), (kind, problems)
    damaged = d.db.read_bytes()                                # the last kind: rebuilt
    r = ossyncd("state", "rebuild", "-c", d.config)
    assert r.returncode == 0, r.stderr
    (aside,) = [f for f in tmp_path.glob("state.db.damaged-*") if not f.name.endswith(("-wal", "-shm"))]
    assert aside.read_bytes() == damaged and f"moved aside: {aside}" in r.stdout   # kept for a post-mortem
    d.start()                                                  # the rescan re-checks every file
    converged(d, expected, 60)
    assert d.stop() == 0


def test_an_emptied_state_db_reads_as_empty_and_starts_over_saying_so(tmp_path, emulator):
    """`> state.db` by mistake: `status` said "no such table: files" (exit 1); it shows no
    files, and the daemon's open warns that every file is re-checked (tests/chaos runs the
    daemon through it to convergence)."""
    db = tmp_path / "state.db"
    db.write_bytes(b"")
    cfg = write_config(tmp_path / "c.toml", emulator, state=db, watches=[{"path": str(tmp_path), "prefix": ""}])
    s = ossyncd("status", "-c", cfg)
    assert s.returncode == 0 and "files: none" in s.stdout, s.stdout + s.stderr
    code = ("import sys; from ossyncd import log; log.configure('info', 'json', stream=sys.stdout); "
            f"from ossyncd.state import State; State({str(db)!r}).close()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (warn,) = [e for e in json_lines(r.stdout) if e["event"].startswith("state DB was empty")]
    assert warn["path"] == str(db) and warn["level"] == "warning" and "re-checked" in warn["event"], warn
    assert ossyncd("state", "check", "-c", cfg).returncode == 0 and State(db, readonly=True).schema == len(MIGRATIONS)


def test_readers_of_a_db_the_daemon_has_not_upgraded_yet_say_so(tmp_path, emulator):
    """Found by the power-loss copies (one taken mid-migration): `list` said "no such column:
    stored_key". A reader on an older schema now says to start the daemon, which upgrades it."""
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    for n, migration in enumerate(MIGRATIONS[:4], start=1):
        migration(sqlite_utils.Database(conn))
        conn.execute(f"PRAGMA user_version={n}")
    conn.commit()
    conn.close()
    cfg = write_config(tmp_path / "c.toml", emulator, state=db, watches=[{"path": str(tmp_path), "prefix": ""}])
    for cmd in ("list", "status"):
        r = ossyncd(cmd, "-c", cfg)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (cmd, r.stderr)
        assert f"state DB {db} has schema 4, older than this ossyncd" in r.stderr and "ossyncd run" in r.stderr, r.stderr
    State(db).close()                                          # the daemon's open upgrades it
    assert ossyncd("list", "-c", cfg).returncode == 0


# ------------------------------------------------------------------------ power loss, approximated

def power_loss_round(tmp_path, emulator, daemon_factory, *, copies: int, files: int, seed: int,
                     converge_every: int = 1, verify=None) -> dict:
    """The daemon uploads a workload; `copies` power-loss copies of its state DB are taken at
    random moments. Each copy must hold no false `done`; a daemon started on every
    `converge_every`-th copy must converge (`verify(daemon, expected)`, default `converged`).
    Returns the figures."""
    verify = verify or (lambda c, expected: converged(c, expected, 90))
    rng = random.Random(seed)
    drop = tmp_path / "drop"
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.2}],
                       upload=fast_upload(max_files_in_flight=2, parallel_parts=2),
                       daemon={"rescan_interval": 5.0, "orphan_max_age": 0, "orphan_sweep_interval": 2.0})
    emulator.set_faults([{"op": "UploadPart", "delay_ms": 30}, {"op": "PutObject", "delay_ms": 30}])
    expected = workload(drop, rng, files)
    d.start()
    snaps = []
    wait_until(lambda: d.db.exists(), 30, what="the state DB")
    while len(snaps) < copies:
        n = len(snaps)
        if rng.random() < 0.5:                      # the workload goes on: new files, a rewrite
            key = f"r/f{n}.bin"
            expected[key] = random_file(drop / key, rng.choice([0, 3000, MiB + 5000]), seed=seed * 1000 + n)
        if rng.random() < 0.2:
            key = rng.choice(sorted(expected))
            expected[key] = random_file(drop / key, rng.randint(0, 40_000), seed=seed * 2000 + n)
        time.sleep(rng.uniform(0.05, 0.4))          # a random moment, not a wait for a condition
        dest = tmp_path / f"copy{n}.db"
        snaps.append((dest, power_loss_copy(d.proc.pid, d.db, dest, rng)))
    d.wait_states({"done": len(expected)}, 120)
    assert d.stop() == 0
    emulator.clear_faults()
    checked = started = 0
    for i, (db, _) in enumerate(snaps):
        bad = false_done(emulator, db)
        checked += done_rows(db)
        assert not bad, f"copy {i} of the state DB holds `done` rows without their object: {bad[:5]}"
        if i % converge_every != converge_every - 1:   # the last of each group: the most state
            continue
        c = Daemon(tmp_path, emulator, [], name=f"run{i}")
        c.config, c.db = copy_config(d, db, f"copy{i}"), db
        c.start()
        # its own startup rescan first: a copy already all `done` must be reconciled, not just read
        wait_until(lambda: events(c, "rescan"), 60, what=f"the rescan of the daemon on copy {i}")
        verify(c, expected)
        assert c.stop() == 0
        started += 1
    return {"copies": len(snaps), "daemons_on_copies": started, "files": len(expected),
            "bytes": sum(map(len, expected.values())), "done_rows_checked": checked,
            "wal_cut": sum(1 for _, s in snaps if s["wal_kept"] != s["wal_bytes"]), "false_done": 0, "lost": 0,
            "integrity": "ok"}


@pytest.mark.timeout(180)
def test_power_loss_copies_hold_no_false_done_and_converge(tmp_path, emulator, daemon_factory):
    figures = power_loss_round(tmp_path, emulator, daemon_factory, copies=3, files=6, seed=11, converge_every=3)
    assert figures["copies"] == 3 and figures["daemons_on_copies"] == 1


# ------------------------------------------------------------------------ host limits

def _nofile(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


def userns_inotify_cmd(limit: int) -> list[str] | None:
    """A prefix that runs a command in a new user namespace whose inotify watch limit is
    `limit` (the host's is untouched), or None where user namespaces are not available."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c",
                            "echo 100 > /proc/sys/user/max_inotify_watches"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None
    return ["unshare", "--user", "--map-root-user", "sh", "-c",
            f'echo {limit} > /proc/sys/user/max_inotify_watches && exec "$@"', "sh"]


def limited(d: Daemon, prefix: list[str], nofile: int) -> Daemon:
    """Start `d` with the open-files limit `nofile`, its command behind `prefix`."""
    d.log = open(d.log_path, "ab")
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    d.proc = subprocess.Popen([*prefix, sys.executable, "-m", "ossyncd", "run", "-c", str(d.config)], env=env,
                              stdout=d.log, stderr=subprocess.STDOUT, preexec_fn=_nofile(nofile))
    return d


@pytest.mark.timeout(180)
def test_64_open_files_and_100_inotify_watches_degrade_to_polling_and_lose_nothing(tmp_path, emulator,
                                                                                   daemon_factory):
    prefix = userns_inotify_cmd(100)
    if prefix is None:
        pytest.skip("no user namespaces here (unshare --user --map-root-user failed)")
    drop = tmp_path / "drop"
    rng = random.Random(5)
    expected = {}
    for i in range(120):                                       # 120 folders: more than 100 watches
        if i % 8 == 0:
            key = f"d{i:03d}/f.bin"
            expected[key] = random_file(drop / key, rng.choice([0, 5000, MiB + 7000]), seed=i)
        else:
            (drop / f"d{i:03d}").mkdir(parents=True)
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}],
                       daemon={"rescan_interval": 300.0})
    limited(d, prefix, 64)
    wait_until(lambda: events(d, "inotify_limit_reached"), 30, what="the inotify limit logged")
    limits = Path(f"/proc/{d.proc.pid}/limits").read_text()   # unshare and sh exec: the daemon's own
    assert b"ossyncd" in Path(f"/proc/{d.proc.pid}/cmdline").read_bytes()
    assert [ln.split()[3:5] for ln in limits.splitlines() if ln.startswith("Max open files")] == [["64", "64"]]
    (hit,) = events(d, "inotify_limit_reached")
    assert hit["sysctl"] == "fs.inotify.max_user_watches" and "polling" in hit["fallback"], hit
    (w,) = wait_until(lambda: [w for w in d.status()["watches"] if w.get("events") == "polling"], 15,
                      interval=0.3, what="status showing the watch polling")
    assert w["state"] == "ok" and "fs.inotify.max_user_watches" in w["why"], w
    text = ossyncd("status", "-c", d.config).stdout
    assert f"watch[0] {drop}: ok (events by polling: " in text and "max_user_watches" in text, text
    d.wait_states({"done": len(expected)}, 90)
    for i in range(3):                                         # files arriving after the fallback
        key = f"d{100 + i:03d}/late{i}.bin"
        expected[key] = random_file(drop / key, rng.choice([100, MiB + 3000]), seed=500 + i)
    d.wait_states({"done": len(expected), "failed": 0}, 90)
    for key, data in expected.items():
        assert object_bytes(emulator, key) == data, key
    assert d.stop() == 0
