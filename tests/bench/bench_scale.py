"""Memory and start-up rescan against tree size, peers in the same run:

1. Peak RSS (VmHWM) of `ossyncd run` once its start-up rescan is done, on trees of 10,
   100,000 and 1,000,000 files that are all `done` already (inotify watches included).
2. Start to first rescan done at the largest size, vs a bare os.scandir + stat walk of the
   same tree.
3. Detection while that rescan runs: a second start on the same tree, and 4 KiB files written
   into the watch until its rescan is done; close() to PutObject against the settle window,
   and against the same with no rescan running (the daemon once its rescan is done).
Sizes: OSSYNCD_BENCH_SCALE (comma-separated, default 10,100000,1000000); trees go to
/dev/shm when it is writable (creating a million files on a shared disk takes minutes).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from tests.bench.bench_daemon import SETTLE, close_to_put, config, start_daemon, start_until_rescan
from tests.bench.bench_put import start_emulator
from tests.test_rescan_stream import make_done_tree


def bare_walk(top: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    n, stack = 0, [str(top)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for de in it:
                if de.is_dir(follow_symlinks=False):
                    stack.append(de.path)
                else:
                    de.stat(follow_symlinks=False)
                    n += 1
    return time.perf_counter() - t0, n


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def daemon_rescan(tmp: Path, info: dict, drop: Path, n: int) -> tuple[float, float, float]:
    """(start to rescan done, the rescan's own seconds, peak RSS MiB) for a tree of n done files."""
    cfg = config(tmp, info, drop)
    t0 = time.perf_counter()
    proc, line = start_until_rescan(cfg, tmp / "daemon.log")
    try:
        wall = time.perf_counter() - t0
        time.sleep(1.0)   # the watcher's setup may finish after the rescan
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    assert line["files"] == n, line
    return wall, line["seconds"], rss


def latency_during_rescan(tmp: Path, info: dict, drop: Path) -> tuple[list[float], list[float]]:
    """(close -> PutObject seconds while the start-up rescan runs, the same after it is done)."""
    cfg = tmp / "bench.toml"
    log = tmp / "during.log"
    proc = start_daemon(cfg, log)   # the config at log level info (start_until_rescan set it)
    during: list[float] = []
    after: list[float] = []
    try:
        def logged(event: str) -> bool:
            return f'"event": "{event}"' in log.read_text()
        deadline = time.monotonic() + 60
        while not logged("started"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: {log.read_text()[-2000:]}")
            time.sleep(0.02)
        i = 0
        deadline = time.monotonic() + 300   # a 1,000,000-file rescan takes 10-15 s here
        while not logged("rescan"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no first rescan within 300 s: {log.read_text()[-2000:]}")
            lat = close_to_put(info, drop / f"during{i}.bin", proc, log)
            i += 1
            if not logged("rescan"):   # reached OSS while the rescan still ran
                during.append(lat)
            time.sleep(0.2)
        for j in range(10):
            after.append(close_to_put(info, drop / f"after{j}.bin", proc, log))
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(60)
    for f in drop.glob("during*.bin"):
        f.unlink()
    for f in drop.glob("after*.bin"):
        f.unlink()
    return during, after


def main():
    sizes = [int(x) for x in os.environ.get("OSSYNCD_BENCH_SCALE", "10,100000,1000000").split(",")]
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        proc, info = start_emulator(Path(tmp) / "data")
        try:
            results = []
            for n in sizes:
                with tempfile.TemporaryDirectory(prefix="bench-scale-tree-", dir=shm) as trees:
                    run = Path(tmp) / f"n{n}"
                    run.mkdir()
                    drop = Path(trees) / "drop"
                    drop.mkdir()
                    dirs = max(1, n // 1000)
                    make_done_tree(drop, run / "state.db", dirs, n // dirs)
                    wall, scan_s, rss = daemon_rescan(run, info, drop, n)
                    bare, _ = bare_walk(drop)
                    results.append((n, wall, scan_s, rss, bare))
                    print(f"{n:>9} files: peak RSS {rss:6.1f} MiB, start to rescan done {wall:6.2f} s "
                          f"(rescan {scan_s:.2f} s), bare scandir+stat walk {bare:.2f} s", flush=True)
                    if n == sizes[-1] and n >= 100_000:
                        during, after = latency_during_rescan(run, info, drop)
                        if not during:
                            print(f"detection during the rescan of {n} files: no file reached OSS before the "
                                  "rescan was done", flush=True)
                        else:
                            p50, p50_idle = statistics.median(during), statistics.median(after)
                            print(f"detection during the rescan of {n} files, close -> PutObject "
                                  f"(settle_seconds={SETTLE}): p50 {p50 * 1000:.0f} ms, max {max(during) * 1000:.0f} ms "
                                  f"({len(during)} files); with no rescan running p50 {p50_idle * 1000:.0f} ms; "
                                  f"ratio {p50 / p50_idle:.2f} (target: max <= settle_seconds + 200 ms = "
                                  f"{(SETTLE + 0.2) * 1000:.0f} ms; a closed file's own wait is the 0.2 s "
                                  f"close-quiet period: + 200 ms = 400 ms)",
                                  flush=True)
        finally:
            proc.terminate()
            proc.wait(10)
    small = results[0]
    for n, wall, scan_s, rss, bare in results[1:]:
        print(f"RSS at {n} files vs {small[0]}: +{rss - small[3]:.1f} MiB "
              f"(targets: <= +10 MiB at 100,000; <= 150 MiB total at 1,000,000)")
    n, wall, scan_s, rss, bare = results[-1]
    print(f"start to first rescan at {n} files: {wall:.2f} s vs bare walk {bare:.2f} s: ratio {wall / bare:.2f} "
          f"(target <= 10 s or <= 1.2x)")


if __name__ == "__main__":
    main()
