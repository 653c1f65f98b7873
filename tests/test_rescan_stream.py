"""The rescan streams (docs/architecture.md §3): it merges one folder's entries with one page of
that folder's rows at a time, so what it holds does not grow with the tree; and a tree changed
while the daemon was down reconciles exactly."""

from __future__ import annotations

import os
import sqlite3
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest

from ossyncd import scheduler
from ossyncd.config import Config, OssConfig, StateConfig, UploadConfig, WatchConfig
from ossyncd.model import Identity
from ossyncd.scanner import Entry
from ossyncd.scheduler import Scheduler
from ossyncd.settle import CLOSED
from ossyncd.state import ROW_PAGE, KnownRow, State
from ossyncd.uploader import Uploader
from tests.fakes import MemoryStore
from tests.helpers import bucket_keys, events, object_bytes, random_file, wait_until

MiB = 1024 * 1024


def make_done_tree(root, state_path, dirs: int, per_dir: int) -> int:
    """dirs x per_dir empty files, each with a `done` row of its identity, as a previous run
    leaves them; written in one transaction, so a 200,000-file tree takes seconds."""
    state = State(state_path)   # the schema
    state.close()
    rows = []
    for d in range(dirs):
        sub = root / f"d{d:03}"
        sub.mkdir()
        for f in range(per_dir):
            p = sub / f"f{f:05}.txt"
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
            i = Identity.of(os.stat(p))
            rows.append((str(p), str(root), f"d{d:03}/f{f:05}.txt", i.size, i.mtime_ns, i.inode, i.ctime_ns))
    db = sqlite3.connect(state_path)
    with db:
        db.executemany("INSERT INTO files (path, watch, key, size, mtime_ns, inode, ctime_ns, state, url, etag,"
                       " crc64, mode, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'done', 'u', 'E', '0', 'simple', 0)",
                       rows)
    db.close()
    return len(rows)


class Rig:
    """A Scheduler with its uploader on the in-memory store, over a tree whose files are done."""

    def __init__(self, tmp_path, big_dir, dirs: int, per_dir: int):
        self.root = big_dir / "in"
        self.root.mkdir()
        db = tmp_path / "state.db"
        self.n = make_done_tree(self.root, db, dirs, per_dir)
        self.cfg = Config(oss=OssConfig(endpoint="http://127.0.0.1:9", bucket="unused", signature="v1"),
                          upload=UploadConfig(), state=StateConfig(path=db),
                          watch=(WatchConfig(path=self.root, prefix="", settle_seconds=1.0),))
        self.state = State(db)
        self.pool = ThreadPoolExecutor(1)
        self.sched = Scheduler(self.state, Uploader(self.state, MemoryStore(), self.cfg.upload, part_pool=self.pool,
                                                    url_for=str), self.cfg)

    def close(self) -> None:
        self.sched.shutdown(timeout=5)
        self.pool.shutdown()
        self.state.close()


def streamed_rescan(tmp_path, big_dir, dirs: int, per_dir: int) -> None:
    rig = Rig(tmp_path, big_dir, dirs, per_dir)
    root, sched, n = str(rig.root), rig.sched, rig.n
    try:
        tracemalloc.start()
        scan = sched.scan_root(root, time.time())
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert scan.files == n
        # at most one page of rows and one folder's entries at once, whatever the tree's size
        assert scan.rows_held == ROW_PAGE and scan.entries_held == per_dir, (scan.rows_held, scan.entries_held)
        print(f"rescan of {n} files: {peak / MiB:.2f} MiB traced peak, {scan.rows_held} rows, {scan.entries_held} entries")
        # a dict of every row and a set of every path would take over 100 bytes per file
        assert peak < 8 * MiB, f"rescan of {n} files peaked at {peak / MiB:.1f} MiB traced"
        assert rig.state.counts() == {"done": n}
        assert sched.trackers[root].next_deadline() is None   # nothing to settle: all done
    finally:
        rig.close()


def test_the_merge_compares_the_identity_fields_as_slices():
    # rescan._merge compares row[2:6] with entry[4:8] for a `done` file (what _same compares)
    assert KnownRow._fields[2:6] == Entry._fields[4:8] == ("size", "mtime_ns", "inode", "ctime_ns")


@pytest.mark.timeout(120)
def test_a_new_file_is_uploaded_while_a_rescan_runs(tmp_path, big_dir, monkeypatch):
    monkeypatch.setattr(scheduler, "RESCAN_SLICE", 0.0)   # one folder per tick: the rescan spans many
    rig = Rig(tmp_path, big_dir, dirs=10, per_dir=200)
    root, sched = str(rig.root), rig.sched
    try:
        now = time.time()
        sched.tick(now)
        late = rig.root / "late.txt"
        late.write_bytes(b"arrived while the rescan ran")
        sched.on_event(rig.cfg.watch[0], str(late), CLOSED)
        for _ in range(3):   # intake, settle after the close, dispatch
            now += 0.5
            sched.tick(now)
        row = rig.state.get(str(late))
        assert row is not None and row.state in ("queued", "uploading", "done"), row
        assert root in sched.rescans, "the rescan should still be running"
        wait_until(lambda: (sched.tick(time.time()), root not in sched.rescans)[1], 60, what="the rescan done")
        wait_until(lambda: (sched.tick(time.time()), rig.state.counts().get("done") == rig.n + 1)[1], 30,
                   what="the late file done")
    finally:
        rig.close()


@pytest.mark.timeout(120)
def test_rescan_holds_one_page_of_rows_and_one_folder(tmp_path, big_dir):
    streamed_rescan(tmp_path, big_dir, dirs=10, per_dir=2000)


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_rescan_of_200k_files_holds_one_page_of_rows_and_one_folder(tmp_path, big_dir):
    streamed_rescan(tmp_path, big_dir, dirs=100, per_dir=2000)


@pytest.mark.timeout(180)
def test_tree_changed_while_down_reconciles_exactly(tmp_path, emulator, daemon_factory):
    drop = tmp_path / "drop"
    data = {rel: random_file(drop / rel, 1000 + i, seed=i) for i, rel in enumerate(
        ["top.txt", "a/1.txt", "a/2.txt", "a/sub/3.txt", "b/4.txt", "gone_dir/5.txt", "keep/6.txt"])}
    # these two are refused, so their rows are `failed` (not done) when their files vanish
    random_file(drop / "pend/7.txt", 77, seed=70)
    random_file(drop / "pend_dir/x/8.txt", 88, seed=80)
    emulator.set_faults([{"op": "PutObject", "key_prefix": "pend", "status": 403, "code": "AccessDenied"}])
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}])
    d.start()
    d.wait_states({"done": 7, "failed": 2}, 60)
    assert d.stop() == 0
    emulator.clear_faults()
    puts = emulator.stats()["requests"]["PutObject"]

    # while the daemon is down: add, change, delete, rename, and remove whole folders
    new = {"a/new.txt": random_file(drop / "a/new.txt", 500, seed=100),
           "newdir/deep/n.txt": random_file(drop / "newdir/deep/n.txt", 600, seed=101),
           "a/1.txt": random_file(drop / "a/1.txt", 4321, seed=102)}
    (drop / "a/2.txt").unlink()
    os.rename(drop / "b/4.txt", drop / "a/sub/4-renamed.txt")
    new["a/sub/4-renamed.txt"] = data["b/4.txt"]
    for folder in ("gone_dir", "pend_dir"):
        for dirpath, _, names in os.walk(drop / folder, topdown=False):
            for name in names:
                os.unlink(os.path.join(dirpath, name))
            os.rmdir(dirpath)
    (drop / "pend/7.txt").unlink()

    d.start()
    wait_until(lambda: len(events(d, "rescan")) >= 2, 60, what="the start-up rescan of the second run")
    wait_until(lambda: object_bytes(emulator, "a/1.txt") == new["a/1.txt"], 60, what="the changed file re-sent")
    d.wait_states({"done": 10, "gone": 2, "failed": 0, "settling": 0, "queued": 0}, 60)
    assert d.stop() == 0
    gone = sorted(os.path.relpath(f["path"], drop) for f in d.files("gone"))
    assert gone == ["pend/7.txt", "pend_dir/x/8.txt"]
    # what was deleted stays uploaded; each new, changed or renamed file was sent once, nothing else
    expected = {**data, **new}
    assert bucket_keys(emulator) == sorted(expected)
    for key, body in expected.items():
        assert object_bytes(emulator, key) == body, key
    assert emulator.stats()["requests"]["PutObject"] == puts + 4


@pytest.mark.parametrize("page", [1, 3, ROW_PAGE])
def test_child_rows_gives_each_child_and_one_marker_per_child_folder(tmp_path, page):
    # the rescan's cursor: every row directly in the folder, in path order, and one `subdir`
    # marker per child folder that holds rows, whatever the paging (a short read follows a
    # marker; "b0.txt" sorts between "b/..." rows and "b0/..." rows; another watch's rows stay out)
    db = tmp_path / "state.db"
    State(db).close()
    root = "/w"
    rels = ["a.txt", "b/1.txt", "b/c/2.txt", "b0.txt", "b0/x.txt", "c.txt", "z/deep/er/f.txt", "zz.txt"]
    rels += [f"s{d:02}/f{f}.txt" for d in range(30) for f in range(d % 4 * 5)]   # empty ones hold no rows
    rels += [f"s{d:02}.txt" for d in range(0, 30, 3)]
    other = [("/w/other.txt", "/elsewhere")]
    con = sqlite3.connect(db)
    with con:
        con.executemany("INSERT INTO files (path, watch, key, state, updated_at) VALUES (?, ?, '', 'done', 0)",
                        [(f"{root}/{r}", root) for r in rels] + other)
    con.close()
    state = State(db)
    try:
        got = [(r.path, r.subdir) for p in state.child_rows(root, root, page=page) for r in p]
        assert all(len(p) <= page for p in state.child_rows(root, root, page=page))
        # a marker stands where its folder's block of rows starts: at "name/", after "name.txt"
        want = sorted({(f"{root}/{r.split('/')[0]}", int("/" in r)) for r in rels}, key=lambda m: m[0] + "/" * m[1])
        assert got == want
        under = [r.path for p in state.rows_under(root, "/w/z", page=page) for r in p]
        assert under == ["/w/z/deep/er/f.txt"]
    finally:
        state.close()


@pytest.mark.timeout(120)
def test_a_page_compared_whole_still_finds_each_change(tmp_path, big_dir):
    # four pages of one folder, each with one difference, beside untouched pages elsewhere: a
    # changed file, a new one between two done ones, a row still `waiting` (for its marker) and
    # a deleted file are each decided as the per-row merge decides them
    rig = Rig(tmp_path, big_dir, dirs=2, per_dir=ROW_PAGE * 3 + 100)
    root, sched = str(rig.root), rig.sched
    folder = rig.root / "d000"
    try:
        changed = folder / "f00010.txt"
        changed.write_bytes(b"changed while the daemon was down")
        new = folder / "f00600a.txt"      # sorts between f00600.txt and f00601.txt
        new.write_bytes(b"new")
        (folder / "f01550.txt").unlink()   # a done row whose file went: stays done
        waiting = folder / "f01060.txt"
        rig.state.db.execute("UPDATE files SET state='waiting' WHERE path=?", [str(waiting)])
        scan = sched.scan_root(root, time.time())
        assert scan.files == rig.n   # one deleted, one new
        tracker = sched.trackers[root]
        assert {p for p in map(str, folder.iterdir()) if tracker.settling(p)} == {str(changed), str(new), str(waiting)}
        assert len(tracker) == 3
        assert rig.state.get(str(folder / "f01550.txt")).state == "done"
    finally:
        rig.close()
