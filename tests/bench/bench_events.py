"""A hook that sleeps 60 s must not slow uploads (issue #14's acceptance: within 10 %).

The small-file rate of `ossyncd run` (4 KiB files dropped at once until all are `done`) with
no hook, then with an `uploaded` hook whose command sleeps 60 s (every delivery slot stays
busy for the whole run), then with no hook again, all in one run against one emulator (after
an unmeasured warm-up run); the ratio compares the hook run with the mean of the two runs
without. Count:
OSSYNCD_BENCH_EVENTS (2000).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.bench_daemon import CONCURRENCY, config, done_count, start_until_rescan
from tests.bench.bench_put import start_emulator


def hook_section(tmp: Path) -> str:
    sleeper = tmp / "sleep.sh"
    sleeper.write_text("#!/bin/sh\nexec sleep 60\n")
    sleeper.chmod(0o700)
    return f"""
[events]
concurrency = 4
[[hook]]
on = ["uploaded"]
command = ["{sleeper}"]
timeout = 120
"""


def rate(tmp: Path, info: dict, src: Path, name: str, extra: str = "") -> float:
    work, drop = tmp / name, tmp / f"drop-{name}"
    work.mkdir()
    drop.mkdir()
    cfg = config(work, info, drop)
    cfg.write_text(cfg.read_text().replace('prefix = "d/"', f'prefix = "{name}/"') + extra)
    proc, _ = start_until_rescan(cfg, work / "daemon.log")   # started, its (empty) rescan done
    n = len(list(src.iterdir()))
    t0 = time.perf_counter()
    subprocess.run(f"cp -r {src}/. {drop}/", shell=True, check=True)
    while done_count(cfg) < n:
        if proc.poll() is not None:
            raise RuntimeError((work / "daemon.log").read_text()[-2000:])
        time.sleep(0.1)
    r = n / (time.perf_counter() - t0)
    proc.terminate()
    proc.wait(30)
    return r


def main():
    n = int(os.environ.get("OSSYNCD_BENCH_EVENTS", "2000"))
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        for i in range(n):
            (src / f"f{i:05d}.bin").write_bytes(os.urandom(4096))
        proc, info = start_emulator(tmp / "data")
        try:
            rate(tmp, info, src, "warmup")   # not counted: the first run pays for cold caches
            before = rate(tmp, info, src, "plain1")
            hooked = rate(tmp, info, src, "hooked", hook_section(tmp))
            after = rate(tmp, info, src, "plain2")
        finally:
            proc.terminate()
            proc.wait(10)
    plain = (before + after) / 2
    print(f"{n} x 4 KiB dropped at once, {CONCURRENCY} uploads in flight")
    print(f"  no hook:                 {before:7.0f} and {after:7.0f} files/s (mean {plain:.0f})")
    print(f"  hook sleeping 60 s:      {hooked:7.0f} files/s (4 delivery slots, all asleep)")
    print(f"  ratio hook / no hook:    {hooked / plain:.2f} (target >= 0.90)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
