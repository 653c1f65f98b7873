"""SIGHUP applies the [upload] settings the README promises to a running daemon, measured on
real uploads against the emulator; the settings that need a restart say so by key."""

from __future__ import annotations

import signal
import time

import pytest

from tests.helpers import MiB, events, fast_upload, object_bytes, random_file, wait_until, write_config

SETTLE = {"settle_seconds": 0.3}


def reload(d, emulator, drop, **upload) -> None:
    """Rewrite the daemon's config with these [upload] settings, SIGHUP it, wait for the reload."""
    before = len(events(d, "config reloaded"))
    write_config(d.config, emulator, state=d.db, watches=[{"path": str(drop), "prefix": "", **SETTLE}],
                 upload=fast_upload(**upload), daemon={"rescan_interval": 5.0})
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(events(d, "config reloaded")) > before, 15, what="config reloaded")


def received(emulator) -> int:
    return emulator.stats()["bytes_received"]


def rate_while(emulator, until, timeout: float) -> float:
    """Bytes/s the emulator received from now until `until()` holds."""
    b0, t0 = received(emulator), time.monotonic()
    wait_until(until, timeout, interval=0.05, what="upload progress")
    return (received(emulator) - b0) / (time.monotonic() - t0)


@pytest.fixture
def drop(tmp_path):
    p = tmp_path / "drop"
    p.mkdir()
    return p


@pytest.mark.timeout(120)
def test_sighup_raises_bandwidth_limit_mid_upload(emulator, daemon_factory, drop):
    d = daemon_factory([{"path": str(drop), "prefix": "", **SETTLE}],
                       upload=fast_upload(bandwidth_limit="1MiB"))
    d.start()
    data = random_file(drop / "big.bin", 10 * MiB, seed=1)
    wait_until(lambda: received(emulator) >= 1.5 * MiB, 30, what="past the first second's burst")
    start = received(emulator)
    limited = rate_while(emulator, lambda: received(emulator) >= start + 1.5 * MiB, 30)
    reload(d, emulator, drop, bandwidth_limit="64MiB")
    left = len(data) - received(emulator)
    assert left > 3 * MiB, "the upload should still be mid-way at the reload"
    raised = rate_while(emulator, lambda: emulator.stats()["uploads_completed"] == 1, 60)
    print(f"\n[reload] limited {limited / MiB:.2f} MiB/s, after SIGHUP {raised / MiB:.2f} MiB/s")
    assert limited <= 1.6 * MiB, limited
    assert raised >= 3 * limited, (limited, raised)
    assert object_bytes(emulator, "big.bin") == data


@pytest.mark.timeout(120)
def test_sighup_sets_a_bandwidth_limit_on_an_unlimited_daemon(emulator, daemon_factory, drop):
    d = daemon_factory([{"path": str(drop), "prefix": "", **SETTLE}])
    d.start()
    wait_until(lambda: events(d, "started"), 30, what="daemon started")
    reload(d, emulator, drop, bandwidth_limit="1MiB")
    data = random_file(drop / "big.bin", 4 * MiB, seed=2)
    wait_until(lambda: received(emulator) > 0, 30, interval=0.02, what="first bytes")
    t0 = time.monotonic()
    d.wait_states({"done": 1}, 60)
    took = time.monotonic() - t0
    # 4 MiB at 1 MiB/s with a one-second burst: about 3 s; unlimited it takes a fraction of that
    assert took >= 2.0, f"4 MiB took {took:.2f}s under a 1 MiB/s limit"
    assert object_bytes(emulator, "big.bin") == data


@pytest.mark.timeout(120)
def test_sighup_changes_request_retries(emulator, daemon_factory, drop):
    d = daemon_factory([{"path": str(drop), "prefix": "", **SETTLE}], upload=fast_upload(request_retries=0))
    d.start()
    wait_until(lambda: events(d, "started"), 30, what="daemon started")
    # request_retries = 0: one 503 sends the file to retry_wait, and it comes back later
    emulator.set_faults([{"op": "PutObject", "status": 503, "code": "ServiceUnavailable", "count": 1}])
    a = random_file(drop / "a.txt", 100, seed=3)
    d.wait_states({"done": 1}, 30)
    (row,) = d.files()
    assert row["attempts"] == 1 and emulator.stats()["requests"]["PutObject"] == 2, row
    reload(d, emulator, drop, request_retries=5)
    emulator.reset_stats()
    emulator.set_faults([{"op": "PutObject", "status": 503, "code": "ServiceUnavailable", "count": 3}])
    b = random_file(drop / "b.txt", 200, seed=4)
    d.wait_states({"done": 2}, 30)
    stats = emulator.stats()
    row = {r["path"]: r for r in d.files()}[str(drop / "b.txt")]
    # the same kind of fault, three times over, absorbed within one upload
    assert row["attempts"] == 0, row
    assert stats["requests"]["PutObject"] == 4 and stats["errors"]["PutObject"]["ServiceUnavailable"] == 3, stats
    assert object_bytes(emulator, "a.txt") == a and object_bytes(emulator, "b.txt") == b


@pytest.mark.timeout(120)
def test_sighup_shortens_the_file_retry_delay(emulator, daemon_factory, drop):
    slow = {"request_retries": 0, "file_retry_delay": 60.0, "file_retry_delay_max": 3600.0}
    d = daemon_factory([{"path": str(drop), "prefix": "", **SETTLE}], upload=fast_upload(**slow))
    d.start()
    wait_until(lambda: events(d, "started"), 30, what="daemon started")
    reload(d, emulator, drop, request_retries=0, file_retry_delay=0.5, file_retry_delay_max=1.0)
    emulator.set_faults([{"op": "PutObject", "status": 503, "code": "ServiceUnavailable", "count": 3}])
    data = {f"f{i}.txt": random_file(drop / f"f{i}.txt", 100 + i, seed=10 + i) for i in range(3)}
    # each file fails once; with the old delay (a random 0-60 s plus 30 s) they would wait far longer
    d.wait_states({"done": 3}, 15)
    assert all(r["attempts"] == 1 for r in d.files()), d.files()
    for name, body in data.items():
        assert object_bytes(emulator, name) == body


@pytest.mark.timeout(60)
def test_sighup_names_settings_that_need_a_restart(emulator, daemon_factory, drop):
    d = daemon_factory([{"path": str(drop), "prefix": "", **SETTLE}])
    d.start()
    wait_until(lambda: events(d, "started"), 30, what="daemon started")
    reload(d, emulator, drop, parallel_parts=2, max_files_in_flight=1)
    warned = {e["key"] for e in events(d, "setting changed; restart to apply")}
    assert warned == {"upload.parallel_parts", "upload.max_files_in_flight"}, warned
    assert all(e["level"] == "warning" for e in events(d, "setting changed; restart to apply"))
    data = random_file(drop / "after.bin", 3 * MiB, seed=5)   # uploads carry on with the running pools
    d.wait_states({"done": 1}, 30)
    assert object_bytes(emulator, "after.bin") == data
    assert d.stop() == 0
