"""Short versions of the chaos scenarios (tests/chaos/, `make chaos`) in `make test`: the same
code at small counts, so a regression shows here first."""

from __future__ import annotations

import json
import signal
import sqlite3

import pytest

from tests.chaos import scenarios
from tests.helpers import MiB, events, object_bytes, ossyncd, random_file, wait_until, write_config


@pytest.mark.timeout(120)
def test_kills_short(tmp_path, daemon_factory):
    # the other crash points: test_after_upload_action_finished_after_a_kill_before_it, and make chaos
    f = scenarios.kills(tmp_path, daemon_factory, random_kills=1, per_point=1, max_size=1 * MiB, deadline=100,
                        points=("after_complete", "after_initiate", "in_commit"), first=6)
    assert f["kills"] == 4 and f["crashpoints"] >= 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action", ["delete", "move"])
def test_after_upload_action_finished_after_a_kill_before_it(tmp_path, emulator, daemon_factory, action):
    # Regression (found by the kill scenario): a kill between the commit of `done` and the
    # delete or move left the source in the drop folder for good; a rescan saw a `done` row
    # with the same identity and did nothing.
    moved = tmp_path / "moved"
    src = tmp_path / "drop" / "a.bin"
    data = random_file(src, 3000, seed=1)
    extra = {"move_to": moved} if action == "move" else {}
    d = daemon_factory([{"path": tmp_path / "drop", "prefix": "p/", "after_upload": action, "settle_seconds": 0.2,
                         **extra}])
    d.start(env={"OSSYNCD_CRASHPOINT": "after_upload_action:1"})
    wait_until(lambda: d.proc.poll() is not None, 30, what="the crash point")
    d.stop()
    assert d.proc.returncode == -signal.SIGKILL and events(d, "crashpoint"), d.output()[-2000:]
    assert src.read_bytes() == data and d.status()["counts"]["done"] == 1
    d.start()
    wait_until(lambda: not src.exists(), 30, what=f"the source {action}d after the restart")
    if action == "move":
        assert (moved / "a.bin").read_bytes() == data
    assert object_bytes(emulator, "p/a.bin") == data
    d.stop()


@pytest.mark.timeout(120)
def test_faults_short(tmp_path, emulator, daemon_factory):
    f = scenarios.faults(tmp_path, daemon_factory, emulator, target=100, p=0.05, per_round=10, deadline=90)
    assert f["faults"] >= 100


@pytest.mark.timeout(120)
def test_rotations_short(tmp_path, emulator, daemon_factory):
    f = scenarios.rotations(tmp_path, daemon_factory, emulator, target=3, deadline=90, files=3, max_size=2 * MiB)
    assert f["rotations"] >= 3


@pytest.mark.timeout(120)
def test_sts_down_short(tmp_path, emulator, daemon_factory):
    f = scenarios.sts_down(tmp_path, daemon_factory, emulator, down=5, token=2, backoff_max=2.0, files=1,
                           max_size=1 * MiB)
    assert f["waited"] > 0


@pytest.mark.timeout(120)
def test_oss_down_short(tmp_path, emulator, daemon_factory):
    f = scenarios.oss_down(tmp_path, daemon_factory, emulator, down=5, files=6, max_size=1 * MiB)
    assert f["max_attempts"] >= 2


@pytest.mark.timeout(120)
def test_sigstop_short(tmp_path, emulator, daemon_factory):
    scenarios.sigstop(tmp_path, daemon_factory, emulator, stopped=3, token=2, files=4, max_size=2 * MiB)


def test_status_while_the_first_start_creates_the_state_db(tmp_path, emulator):
    # Regression (found by the SIGSTOP scenario): `status` run while a first start had created
    # the DB file but not yet its schema failed with "no such table: files".
    cfg = write_config(tmp_path / "c.toml", emulator, state=tmp_path / "state.db",
                       watches=[{"path": str(tmp_path), "prefix": "p/"}])
    sqlite3.connect(tmp_path / "state.db").execute("PRAGMA journal_mode=WAL").fetchall()   # schema version 0
    for cmd in ("status", "list"):
        r = ossyncd(cmd, "-c", cfg, "--json")
        assert r.returncode == 0, r.stderr
    assert json.loads(ossyncd("status", "-c", cfg, "--json").stdout)["counts"]["done"] == 0
    assert json.loads(ossyncd("list", "-c", cfg, "--json").stdout) == []
