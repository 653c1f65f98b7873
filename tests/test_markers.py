"""Ready markers (ready_suffix, ready_file) and prune_empty_dirs, end to end: the daemon as a
subprocess against the emulator, with byte-equal read-back (docs/architecture.md §3)."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers import bucket_keys, events, object_bytes, ossyncd, random_file, wait_until

SETTLE = 0.3


def add_hook(d, on=("uploaded", "failed", "skipped", "gone")) -> None:
    """A [[hook]] that accepts everything: its outbox shows which events the daemon fired."""
    with open(d.config, "a") as f:
        f.write("[[hook]]\non = " + json.dumps(list(on)) + '\ncommand = ["/bin/true"]\n')


def fired(d) -> list[tuple[str, str]]:
    """(kind, path) of every event in the outbox (what `ossyncd events` lists)."""
    return [(e.kind, e.path) for e in read_db(d, lambda s: s.events())]


def read_db(d, fn):
    """fn(state) on the daemon's state DB, read as `list` reads it (polling through the CLI
    would cost a process start per look); None while the daemon is still creating it."""
    from ossyncd.errors import StateError
    from ossyncd.state import State

    if not d.db.exists():
        return None
    try:
        state = State(d.db, readonly=True)
        try:
            return fn(state)
        finally:
            state.close()
    except StateError:
        return None


def waiting(d) -> int:
    return read_db(d, lambda s: s.counts().get("waiting", 0)) or 0


def row(d, path: Path) -> dict | None:
    f = read_db(d, lambda s: s.get(str(path)))
    return None if f is None else {"path": f.path, "state": f.state, "error": f.error}


def in_state(d, path: Path, state: str, error_part: str = "") -> bool:
    f = row(d, path)
    return f is not None and f["state"] == state and error_part in (f["error"] or "")


def uploaded_order(d) -> list[str]:
    """Paths in the order of the daemon's `uploaded` log lines."""
    return [e["path"] for e in events(d, "uploaded")]


def rescans(d) -> int:
    return len(events(d, "rescan"))


def when(line: dict) -> float:
    return datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()


def wait_waiting_past_rescan(d, path: Path, since: float, what: str) -> None:
    """Listed as waiting for its marker, held for 3x the settle time, and a rescan started
    after that has passed too (the rescan would have queued it if it were ready)."""
    wait_until(lambda: in_state(d, path, "waiting", "waiting for marker"), 20, what=f"{what} waiting")
    seen = rescans(d)
    wait_until(lambda: time.time() - since >= 3 * SETTLE and rescans(d) > seen, 20, what="a later rescan")
    listed = next(f for f in d.files() if f["path"] == str(path))        # what `ossyncd list` shows
    assert listed["state"] == "waiting" and "waiting for marker" in listed["error"], listed


@pytest.mark.timeout(120)
def test_ready_suffix_holds_a_file_until_its_marker(tmp_path, emulator, daemon_factory):
    drop = tmp_path / "drop"
    drop.mkdir()
    pre = random_file(drop / "pre.csv", 3000, seed=1)
    (drop / "pre.csv.done").touch()                       # a marker there at start-up releases its file
    t0 = time.time()
    a = random_file(drop / "a.csv", 2 * 1024 * 1024, seed=2)   # multipart: the marker gates every path
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": SETTLE, "ready_suffix": ".done"}],
                       daemon={"rescan_interval": 1.0})
    add_hook(d)
    d.start()
    wait_until(lambda: in_state(d, drop / "pre.csv", "done"), 30, what="pre.csv uploaded")
    wait_waiting_past_rescan(d, drop / "a.csv", t0, "a.csv")
    assert bucket_keys(emulator) == ["pre.csv"]           # neither a.csv nor any marker
    st = d.status()
    assert st["counts"]["waiting"] == 1 and st["counts"]["failed"] == 0
    assert [f for f in st["failures"] if f["path"] == str(drop / "a.csv")] == []   # not a problem
    assert emulator.stats()["uploads_initiated"] == 0
    text = ossyncd("list", "-c", d.config).stdout                    # piped: tab-separated rows
    assert f"{drop / 'a.csv'}\twaiting\t" in text and "\twaiting for marker a.csv.done" in text, text

    # the marker arrives: a.csv goes at once
    (drop / "a.csv.done").touch()
    t_marker = time.time()
    wait_until(lambda: in_state(d, drop / "a.csv", "done"), 15, what="a.csv uploaded after its marker")
    line = next(e for e in events(d, "uploaded") if e["path"] == str(drop / "a.csv"))
    latency = when(line) - t_marker
    print(f"marker to uploaded: {latency:.3f} s")
    assert latency < 5.0, latency                          # generous: the brief's 1 s is measured above
    assert object_bytes(emulator, "a.csv") == a and object_bytes(emulator, "pre.csv") == pre

    # a marker before its file: written after it, the file is not vouched for and waits...
    (drop / "w.csv.done").touch()
    random_file(drop / "w.csv", 500, seed=6)
    wait_until(lambda: in_state(d, drop / "w.csv", "waiting", "changed after w.csv.done"), 15,
               what="w.csv, written after its marker, held")
    # ...but a copy that keeps times (cp -p) may create the marker first: the file goes once settled
    staging = tmp_path / "staging"
    b = random_file(staging / "b.csv", 500, seed=3)
    (staging / "b.csv.done").touch()
    shutil.copy2(staging / "b.csv.done", drop / "b.csv.done")
    shutil.copy2(staging / "b.csv", drop / "b.csv")
    wait_until(lambda: in_state(d, drop / "b.csv", "done"), 15, what="b.csv (marker copied first) uploaded")
    assert object_bytes(emulator, "b.csv") == b

    # rewritten after its marker: the old marker does not vouch for the new bytes
    pre2 = random_file(drop / "pre.csv", 4000, seed=4)
    wait_until(lambda: in_state(d, drop / "pre.csv", "waiting", "changed after pre.csv.done"), 15,
               what="pre.csv held after a rewrite")
    assert object_bytes(emulator, "pre.csv") == pre
    os.utime(drop / "pre.csv.done")                        # the writer says it is complete again
    wait_until(lambda: object_bytes(emulator, "pre.csv") == pre2 and in_state(d, drop / "pre.csv", "done"), 15,
               what="pre.csv re-uploaded after its marker was written again")

    # a marker removed again before the upload started holds its file (paused: nothing starts)
    assert ossyncd("pause", "-c", d.config).returncode == 0
    random_file(drop / "c.csv", 100, seed=5)
    (drop / "c.csv.done").touch()
    wait_until(lambda: in_state(d, drop / "c.csv", "queued"), 15, what="c.csv released while paused")
    os.unlink(drop / "c.csv.done")
    assert ossyncd("resume", "-c", d.config).returncode == 0
    wait_until(lambda: in_state(d, drop / "c.csv", "waiting", "c.csv.done (it was removed)"), 15,
               what="c.csv held again: its marker was removed")
    assert "c.csv" not in bucket_keys(emulator)

    # a restart: a marker written while the daemon was down releases its file
    assert d.stop() == 0
    (drop / "c.csv.done").touch()
    d.start()
    wait_until(lambda: in_state(d, drop / "c.csv", "done"), 30, what="c.csv uploaded after the restart")
    assert bucket_keys(emulator) == ["a.csv", "b.csv", "c.csv", "pre.csv"]   # never a marker
    kinds = fired(d)
    assert not [k for k in kinds if k[0] != "uploaded"], kinds
    assert in_state(d, drop / "w.csv", "waiting")   # waiting is never a failure or any event
    assert d.stop() == 0


@pytest.mark.timeout(120)
def test_ready_file_uploads_a_folder_then_its_sentinel_last(tmp_path, emulator, daemon_factory):
    drop = tmp_path / "drop"
    batch = drop / "2024" / "part"
    t0 = time.time()
    data = {f"f{i}.bin": random_file(batch / f"f{i}.bin", 200 + i, seed=i) for i in range(5)}
    data["big.bin"] = random_file(batch / "big.bin", 2 * 1024 * 1024, seed=9)
    other = random_file(drop / "2024" / "other.txt", 10, seed=10)      # its folder has no sentinel
    d = daemon_factory([{"path": str(drop), "prefix": "t/", "settle_seconds": SETTLE, "ready_file": "_SUCCESS"}],
                       daemon={"rescan_interval": 1.0})
    add_hook(d)
    d.start()
    wait_until(lambda: waiting(d) == 7, 20, what="every file waiting")
    wait_waiting_past_rescan(d, batch / "big.bin", t0, "big.bin")
    assert bucket_keys(emulator) == [] and emulator.stats()["uploads_initiated"] == 0

    # one file of the batch fails for good: the sentinel must not claim the folder complete
    emulator.set_faults([{"op": "PutObject", "key_prefix": "t/2024/part/f3", "status": 403, "code": "AccessDenied"}])
    (batch / "_SUCCESS").write_bytes(b"")
    wait_until(lambda: in_state(d, batch / "f3.bin", "failed"), 30, what="f3.bin failed")
    wait_until(lambda: in_state(d, batch / "big.bin", "done"), 30, what="the rest of the batch uploaded")
    assert in_state(d, batch / "_SUCCESS", "waiting", "sentinel: waiting for the other files of its folder")
    assert "t/2024/part/_SUCCESS" not in bucket_keys(emulator)
    emulator.clear_faults()
    assert ossyncd("retry", "-c", d.config).returncode == 0
    wait_until(lambda: in_state(d, batch / "_SUCCESS", "done"), 30, what="the folder and its sentinel uploaded")
    order = uploaded_order(d)
    assert order[-1] == str(batch / "_SUCCESS"), order
    assert sorted(order[:-1]) == sorted(str(batch / n) for n in data), order
    for name, body in data.items():
        assert object_bytes(emulator, f"t/2024/part/{name}") == body
    assert object_bytes(emulator, "t/2024/part/_SUCCESS") == b""
    assert in_state(d, drop / "2024" / "other.txt", "waiting", "waiting for marker _SUCCESS in its folder")

    # a file added after the sentinel waits for a new one; then the sentinel goes again, last
    late = random_file(batch / "late.bin", 300, seed=11)
    wait_until(lambda: in_state(d, batch / "late.bin", "waiting", "changed after _SUCCESS"), 15,
               what="late.bin held for a new sentinel")
    (batch / "_SUCCESS").write_bytes(b"batch 2")
    wait_until(lambda: object_bytes(emulator, "t/2024/part/_SUCCESS") == b"batch 2", 30,
               what="the new sentinel uploaded")
    order = uploaded_order(d)
    assert order[-2:] == [str(batch / "late.bin"), str(batch / "_SUCCESS")], order
    assert object_bytes(emulator, "t/2024/part/late.bin") == late
    assert "t/2024/other.txt" not in bucket_keys(emulator)
    (drop / "2024" / "_SUCCESS").touch()
    wait_until(lambda: in_state(d, drop / "2024" / "_SUCCESS", "done"), 30, what="the parent folder's sentinel")
    assert object_bytes(emulator, "t/2024/other.txt") == other
    assert uploaded_order(d)[-2:] == [str(drop / "2024" / "other.txt"), str(drop / "2024" / "_SUCCESS")]
    assert [k for k in fired(d) if k[0] != "uploaded"] == [("failed", str(batch / "f3.bin"))]
    assert d.stop() == 0


@pytest.mark.timeout(120)
def test_markers_follow_their_file_and_emptied_folders_are_pruned(tmp_path, emulator, daemon_factory):
    moved, drop, drop2 = tmp_path / "moved", tmp_path / "drop", tmp_path / "drop2"
    x = random_file(drop / "sub" / "a" / "x.bin", 1000, seed=1)
    y = random_file(drop / "sub" / "b" / "deep" / "y.bin", 1000, seed=2)
    for p in (drop / "sub" / "a" / "x.bin.done", drop / "sub" / "b" / "deep" / "y.bin.done"):
        p.touch()
    random_file(drop / "keep" / "z.bin", 10, seed=3)         # no marker: stays, so its folder stays
    (drop / "empty").mkdir()                                  # never emptied by an upload: kept
    (moved / "sub" / "a").mkdir(parents=True)                 # move_to's own empty folder: never pruned
    (moved / "unrelated").mkdir()
    u = random_file(drop2 / "in" / "u.bin", 700, seed=4)
    (drop2 / "in" / "u.bin.done").write_bytes(b"ok")
    common = {"settle_seconds": SETTLE, "ready_suffix": ".done", "prune_empty_dirs": True, "prune_min_age": 0.2}
    d = daemon_factory([
        {"path": str(drop), "prefix": "m/", "after_upload": "move", "move_to": str(moved), **common},
        {"path": str(drop2), "prefix": "u/", "after_upload": "delete", "upload_markers": True, **common},
    ])
    d.start()
    wait_until(lambda: not (drop / "sub").exists() and not (drop2 / "in").exists(), 30,
               what="emptied folders pruned")
    assert sorted(p.name for p in drop.iterdir()) == ["empty", "keep"] and drop2.is_dir()   # roots kept
    assert (moved / "sub" / "a" / "x.bin").read_bytes() == x and (moved / "sub" / "a" / "x.bin.done").exists()
    assert (moved / "sub" / "b" / "deep" / "y.bin").read_bytes() == y
    assert (moved / "sub" / "b" / "deep" / "y.bin.done").exists() and (moved / "unrelated").is_dir()
    assert (drop / "keep" / "z.bin").exists() and (drop / "empty").is_dir()
    assert object_bytes(emulator, "m/sub/a/x.bin") == x and object_bytes(emulator, "m/sub/b/deep/y.bin") == y
    assert object_bytes(emulator, "u/in/u.bin") == u and object_bytes(emulator, "u/in/u.bin.done") == b"ok"
    assert "m/sub/a/x.bin.done" not in bucket_keys(emulator)          # upload_markers is off for drop
    order = uploaded_order(d)
    assert order.index(str(drop2 / "in" / "u.bin")) < order.index(str(drop2 / "in" / "u.bin.done")), order
    removed = [e["path"] for e in events(d, "empty folder removed")]
    assert sorted(removed) == sorted(str(p) for p in (drop / "sub" / "a", drop / "sub" / "b" / "deep",
                                                       drop / "sub" / "b", drop / "sub", drop2 / "in")), removed
    assert d.stop() == 0


def test_pruner_removes_only_emptied_folders_below_the_root_once_old_enough(tmp_path):
    """Pruner alone, on a real tree: the age is the folder's own mtime, the root and anything
    outside it are never candidates, and a folder that filled up again is left alone."""
    from ossyncd.config import WatchConfig
    from ossyncd.prune import Pruner

    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "full").mkdir()
    (root / "full" / "x").touch()
    (tmp_path / "outside").mkdir()
    w = WatchConfig(path=root, after_upload="delete", prune_empty_dirs=True, prune_min_age=30)
    p = Pruner()
    for path in (root / "a" / "b" / "f", root / "full" / "f", root / "f", tmp_path / "outside" / "f"):
        p.emptied(w, str(path))
    assert sorted(p.candidates) == [str(root / "a" / "b"), str(root / "full")]   # never the root or outside
    now = time.time()
    assert p.tick({str(root): w}, now) == []                  # b: empty for less than 30 s; full: not empty
    assert list(p.candidates) == [str(root / "a" / "b")]
    old = now - 60
    os.utime(root / "a" / "b", (old, old))
    assert p.tick({str(root): w}, now) == [str(root / "a" / "b")]
    assert list(p.candidates) == [str(root / "a")]            # its parent is next, with its own age
    assert p.tick({str(root): w}, now) == [] and (root / "a").is_dir()
    (root / "a" / "new").touch()                             # filled again: not a candidate any more
    os.utime(root / "a", (old, old))
    assert p.tick({str(root): w}, now) == [] and p.candidates == {}
    assert root.is_dir() and (tmp_path / "outside").is_dir() and (root / "full" / "x").exists()
