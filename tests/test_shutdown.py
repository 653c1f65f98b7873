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


def _catches_sigterm(pid: int) -> bool:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.mark.timeout(120)
def test_sigterm_while_still_starting_is_a_clean_stop(tmp_path, emulator, daemon_factory):
    """A stop that comes before the daemon is up (imports, the build, the start-up rescan) is
    exit 0 and a `stopped` line, never the default kill; the files wait for the next start."""
    drop = tmp_path / "drop"
    drop.mkdir()
    data = random_file(drop / "a.txt", 5000, seed=7)
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}])
    d.start()
    wait_until(lambda: _catches_sigterm(d.proc.pid), 30, interval=0.005, what="SIGTERM handled")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(BOUND) == 0, d.output()[-3000:]
    assert json_lines(d.output())[-1]["event"] in ("stopped", "abandoning threads still running"), d.output()[-2000:]
    d.log.close()
    d.start()
    d.wait_states({"done": 1}, 60)
    assert object_bytes(emulator, "a.txt") == data
    assert d.stop() == 0
