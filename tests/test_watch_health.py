"""Watches that stay alive: a symlinked root gets events, a deleted root is shown and re-armed."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.helpers import events, object_bytes, ossyncd, random_file, wait_until

NO_RESCAN = {"rescan_interval": 300.0}   # only events can bring a file in during a test


@pytest.mark.timeout(90)
def test_symlinked_root_gets_events_long_before_the_rescan(tmp_path, emulator, daemon_factory):
    real = tmp_path / "real-drop"
    real.mkdir()
    link = tmp_path / "drop"
    link.symlink_to(real)
    d = daemon_factory([{"path": str(link), "prefix": "in/", "settle_seconds": 0.3}], daemon=NO_RESCAN).start()
    wait_until(lambda: events(d, "rescan"), 30, what="the startup rescan")
    t0 = time.monotonic()
    data = random_file(real / "new.jpg", 2000, seed=1)
    d.wait_states({"done": 1}, 30)
    assert time.monotonic() - t0 < 30                       # rescan_interval is 300 s
    assert object_bytes(emulator, "in/new.jpg") == data
    (row,) = d.files()
    assert row["path"] == str(link / "new.jpg")              # rows name the configured root
    assert d.stop() == 0


def _watch(d, index=0) -> dict:
    return next(w for w in d.status()["watches"] if w["index"] == index)


@pytest.mark.timeout(120)
def test_deleted_root_is_shown_and_rearmed_when_it_reappears(tmp_path, emulator, daemon_factory):
    drop, other = tmp_path / "drop", tmp_path / "other"
    drop.mkdir()
    other.mkdir()
    d = daemon_factory([{"path": str(drop), "prefix": "a/", "settle_seconds": 0.3},
                        {"path": str(other), "prefix": "b/", "settle_seconds": 0.3}], daemon=NO_RESCAN).start()
    random_file(drop / "first.txt", 100, seed=1)
    d.wait_states({"done": 1}, 30)
    assert _watch(d)["state"] == "ok"

    shutil.rmtree(drop)
    dead = wait_until(lambda: _watch(d)["state"] == "missing" and _watch(d), 15, interval=0.2,
                      what="status showing the watch missing")
    assert dead["path"] == str(drop) and dead["since"]
    assert _watch(d, 1)["state"] == "ok"
    text = ossyncd("status", "-c", d.config).stdout
    assert f"watch[0] {drop}: MISSING since" in text and "recreate the folder" in text

    drop.mkdir()
    wait_until(lambda: _watch(d)["state"] == "ok", 15, interval=0.2, what="status showing the watch back")
    wait_until(lambda: events(d, "watch_root_rearmed") and len(events(d, "rescan")) >= 2, 15,
               what="the re-armed root rescanned")
    data = random_file(drop / "after.txt", 300, seed=2)
    wait_until(lambda: any(f["path"] == str(drop / "after.txt") and f["state"] == "done" for f in d.files()),
               30, interval=0.3, what="after.txt uploaded without a restart")
    assert object_bytes(emulator, "a/after.txt") == data
    assert d.proc.poll() is None
    assert d.stop() == 0
