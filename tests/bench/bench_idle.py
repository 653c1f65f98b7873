"""The idle daemon, against a bare interpreter measured in the same run:

`ossyncd run` watching 10 files that are `done`, after its start-up rescan: RSS, and CPU
time over OSSYNCD_BENCH_IDLE_S seconds (default 60) in which nothing happens, vs
`python -c "import time; time.sleep(...)"` (targets: <= 60 MiB, < 0.5 % of a core).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.bench_daemon import config, done_count, start_until_rescan
from tests.bench.bench_put import start_emulator
from tests.helpers import wait_until

SECONDS = float(os.environ.get("OSSYNCD_BENCH_IDLE_S", "60"))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def idle(pid: int) -> tuple[float, float]:
    """(RSS MiB, % of a core) over SECONDS of nothing happening."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(SECONDS)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    return rss_mib(pid), 100 * (c1 - c0) / (t1 - t0)


def main():
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        tmp = Path(tmp)
        emu, info = start_emulator(tmp / "data")
        try:
            drop = tmp / "drop"
            drop.mkdir()
            (tmp / "d").mkdir()
            for i in range(10):
                (drop / f"f{i}.txt").write_bytes(os.urandom(100))
            cfg = config(tmp / "d", info, drop)
            proc, _ = start_until_rescan(cfg, tmp / "daemon.log")
            try:
                wait_until(lambda: done_count(cfg) == 10, 60, what="the 10 files done")   # then nothing happens
                rss, cpu = idle(proc.pid)
            finally:
                proc.terminate()
                proc.wait(30)
            bare = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({SECONDS + 5})"])
            try:
                time.sleep(1)
                bare_rss, bare_cpu = idle(bare.pid)
            finally:
                bare.kill()
                bare.wait()
        finally:
            emu.terminate()
            emu.wait(10)
    print(f"idle, watching 10 files, over {SECONDS:.0f} s: RSS {rss:.1f} MiB (target <= 60), "
          f"CPU {cpu:.2f} % of a core (target < 0.5)")
    print(f"  bare interpreter: RSS {bare_rss:.1f} MiB, CPU {bare_cpu:.2f} %; the daemon's imports and state: "
          f"+{rss - bare_rss:.1f} MiB, ratio {rss / bare_rss:.1f}x")


if __name__ == "__main__":
    main()
