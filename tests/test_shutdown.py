"""SIGTERM while requests hang: the daemon exits within its shutdown budget (below the unit's
TimeoutStopSec=30), never writes to the closed DB, and the restart finishes every file."""

from __future__ import annotations

import signal
import time

import pytest

from tests.helpers import MiB, json_lines, object_bytes, random_file, wait_until

BOUND = 25.0   # seconds: the daemon's 20 s budget plus interpreter start/stop on a busy host


@pytest.mark.timeout(150)
def test_sigterm_while_requests_hang_exits_in_time_and_resumes(tmp_path, emulator, daemon_factory):
    emulator.set_faults([{"op": "PutObject", "delay_ms": 60_000, "count": 1},
                         {"op": "UploadPart", "delay_ms": 60_000, "count": 2}])
    drop = tmp_path / "drop"
    drop.mkdir()
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}])
    d.start()
    small = random_file(drop / "small.txt", 5000, seed=1)
    big = random_file(drop / "big.bin", 2 * MiB, seed=2)
    wait_until(lambda: len(d.status()["in_flight"]) == 2, 30, interval=0.2, what="both files uploading")
    wait_until(lambda: all(f["remaining"] == 0 for f in emulator.faults.list()), 30,
               what="both hanging requests reached the emulator")
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(BOUND)
    took = time.monotonic() - t0
    assert rc == 0, d.output()[-3000:]
    assert took < BOUND, took
    lines = json_lines(d.output())
    assert lines[-1]["event"] in ("stopped", "abandoning threads still running"), lines[-3:]
    assert not [e for e in lines if e["level"] == "error"], d.output()[-3000:]   # nothing wrote to a closed DB
    d.log.close()

    emulator.clear_faults()
    d.start()
    d.wait_states({"done": 2}, 60)
    assert object_bytes(emulator, "small.txt") == small
    assert object_bytes(emulator, "big.bin") == big
    assert d.stop() == 0
