"""The daemon under load, against peers measured in the same run:

1. 10,000 files of 4 KiB dropped at once: `ossyncd run` until all are `done`, vs a bare
   oss2 thread pool doing only put_object at the same concurrency; and the CPU each spends
   per file (steadier than the rates when other work shares the cores).
2. Detection latency: from a writer's close() to the PutObject reaching the emulator,
   p50/p95, against the settle window.
3. Start-up rescan of 100,000 files that are already `done`: time, and requests sent (0).
4. One large file renamed into the watched folder, to its `uploaded` line, vs `curl -T` of
   the same file to the same emulator.
Counts: OSSYNCD_BENCH_SMALL (10000), OSSYNCD_BENCH_RESCAN (100000), OSSYNCD_BENCH_LARGE_MIB (256).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import oss2

from tests.bench.bench_put import ROOT, MiB, curl_put, make_file, start_emulator, static_config

CONCURRENCY = 8
SETTLE = 1.0


def stats(info) -> dict:
    with urllib.request.urlopen(info["oss"] + "/-/stats") as r:
        return json.loads(r.read())


def config(tmp: Path, info: dict, drop: Path) -> Path:
    return static_config(tmp / "bench.toml", info, tmp / "state.db", f"""
[upload]
max_files_in_flight = {CONCURRENCY}
[daemon]
log_level = "warning"
rescan_interval = 3600
[[watch]]
path = "{drop}"
prefix = "d/"
settle_seconds = {SETTLE}
""")


def start_daemon(cfg: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ossyncd", "run", "-c", str(cfg)], cwd=ROOT,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "NO_PROXY": "127.0.0.1"})


def start_until_rescan(cfg: Path, log: Path) -> tuple[subprocess.Popen, dict]:
    """Start the daemon at log level info and wait for its first `rescan` line: (process, line)."""
    cfg.write_text(cfg.read_text().replace('log_level = "warning"', 'log_level = "info"'))
    proc = start_daemon(cfg, log)
    deadline = time.monotonic() + 300   # a 1,000,000-file tree takes 10-15 s here
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"no first rescan from the daemon: {log.read_text()[-2000:]}")
        for x in log.read_text().splitlines():
            if '"rescan"' in x:
                return proc, json.loads(x)
        time.sleep(0.02)


def done_count(cfg: Path) -> int:
    sys.path.insert(0, str(ROOT / "daemon"))
    from ossyncd.state import State
    st = State(Path(cfg.parent / "state.db"), readonly=True)
    try:
        return st.counts().get("done", 0)
    finally:
        st.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (/proc/PID/stat utime + stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_small_files(tmp: Path, info: dict, n: int) -> tuple[float, float, float, float]:
    """(daemon files/s, pool files/s, daemon CPU ms per file, pool CPU ms per file). The CPU
    figures are steadier than the rates on a shared machine: they say what a file costs."""
    src = tmp / "small-src"
    src.mkdir()
    for i in range(n):
        (src / f"f{i:05d}.bin").write_bytes(os.urandom(4096))
    bucket = oss2.Bucket(oss2.Auth(info["root"]["id"], info["root"]["secret"]), info["oss"], "drop",
                         session=oss2.Session(pool_size=CONCURRENCY + 2))
    files = sorted(src.iterdir())
    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda p: bucket.put_object_from_file(f"pool/{p.name}", str(p)), files))
    pool_rate = n / (time.perf_counter() - t0)
    pool_cpu = (time.process_time() - c0) / n * 1000

    drop = tmp / "drop-small"
    drop.mkdir()
    (tmp / "small").mkdir()
    cfg = config(tmp / "small", info, drop)
    proc = start_daemon(cfg, tmp / "small.log")
    time.sleep(3)                      # started and idle
    t0, c0 = time.perf_counter(), cpu_seconds(proc.pid)
    subprocess.run(f"cp -r {src}/. {drop}/", shell=True, check=True)
    while done_count(cfg) < n:
        if proc.poll() is not None:
            raise RuntimeError((tmp / "small.log").read_text()[-2000:])
        time.sleep(0.2)
    ours = n / (time.perf_counter() - t0)
    ours_cpu = (cpu_seconds(proc.pid) - c0) / n * 1000
    proc.terminate()
    proc.wait(30)
    return ours, pool_rate, ours_cpu, pool_cpu


def close_to_put(info: dict, path: Path, proc: subprocess.Popen, log: Path) -> float:
    """Write and close a 4 KiB file; seconds from its close() to the next PutObject at the emulator."""
    before = stats(info)["requests"].get("PutObject", 0)
    with open(path, "wb") as f:
        f.write(os.urandom(4096))
    closed = time.perf_counter()
    while stats(info)["requests"].get("PutObject", 0) == before:
        if time.perf_counter() - closed > 10:
            raise RuntimeError(f"{path} not uploaded within 10 s; daemon "
                               f"{'exited ' + str(proc.poll()) if proc.poll() is not None else 'running'}; "
                               f"its log ends:\n{log.read_text()[-2000:]}")
        time.sleep(0.005)
    return time.perf_counter() - closed


def bench_latency(tmp: Path, info: dict, count: int = 30) -> list[float]:
    (tmp / "lat").mkdir()
    drop = tmp / "drop-lat"
    drop.mkdir()
    cfg = config(tmp / "lat", info, drop)
    proc, _ = start_until_rescan(cfg, tmp / "lat.log")   # its watches are in place
    try:
        lat = []
        for i in range(count):
            lat.append(close_to_put(info, drop / f"l{i}.bin", proc, tmp / "lat.log"))
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
    return lat


def bench_rescan(tmp: Path, info: dict, n: int) -> tuple[float, float, int]:
    sys.path.insert(0, str(ROOT / "daemon"))
    from ossyncd.model import Identity
    from ossyncd.state import State
    (tmp / "rescan").mkdir()
    drop = tmp / "drop-rescan"
    cfg = config(tmp / "rescan", info, drop)
    state = State(tmp / "rescan" / "state.db")
    with state.db.atomic():      # a previous run's record: every file already done
        for i in range(n):
            d = drop / f"d{i % 100}"
            d.mkdir(parents=True, exist_ok=True)
            p = d / f"f{i}.txt"
            p.write_bytes(b"x")
            st = os.stat(p)
            row, _ = state.observe(str(p), str(drop), f"d/d{i % 100}/f{i}.txt", Identity.of(st))
            state.mark_done(row.id, row.identity, url="u", etag="E", crc64=0, mode="simple")
    state.close()
    uploads = ("PutObject", "InitiateMultipartUpload", "UploadPart", "CompleteMultipartUpload")
    before = sum(stats(info)["requests"].get(op, 0) for op in uploads)
    t0 = time.perf_counter()
    proc, line = start_until_rescan(cfg, tmp / "rescan.log")
    wall = time.perf_counter() - t0
    time.sleep(SETTLE + 1)
    sent = sum(stats(info)["requests"].get(op, 0) for op in uploads) - before
    proc.terminate()
    proc.wait(30)
    assert line["files"] == n, line
    return line["seconds"], wall, sent


def bench_large_file(tmp: Path, info: dict, mib: int) -> tuple[float, float, float]:
    """(daemon MiB/s rename -> `uploaded` line, the line's own MiB/s, curl -T MiB/s)."""
    (tmp / "large").mkdir()
    drop = tmp / "drop-large"
    drop.mkdir()
    src = tmp / "large" / "big.bin"
    make_file(src, mib * MiB)
    curl_s, _ = curl_put(info, src, "curl-large")
    cfg = config(tmp / "large", info, drop)
    log = tmp / "large.log"
    proc, _ = start_until_rescan(cfg, log)
    try:
        time.sleep(1)
        t0 = time.perf_counter()
        os.rename(src, drop / "big.bin")
        while True:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-2000:])
            lines = [json.loads(x) for x in log.read_text().splitlines() if '"uploaded"' in x]
            if lines:
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    return mib / wall, mib / lines[0]["seconds"], mib / curl_s


def main():
    n_small = int(os.environ.get("OSSYNCD_BENCH_SMALL", "10000"))
    n_rescan = int(os.environ.get("OSSYNCD_BENCH_RESCAN", "100000"))
    large_mib = int(os.environ.get("OSSYNCD_BENCH_LARGE_MIB", "256"))
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        tmp = Path(tmp)
        proc, info = start_emulator(tmp / "data")
        try:
            ours, pool, ours_cpu, pool_cpu = bench_small_files(tmp, info, n_small)
            lat = sorted(bench_latency(tmp, info))
            scan_s, scan_wall, sent = bench_rescan(tmp, info, n_rescan)
            large, large_line, large_curl = bench_large_file(tmp, info, large_mib)
        finally:
            proc.terminate()
            proc.wait(10)
    p50, p95 = statistics.median(lat), lat[int(len(lat) * 0.95) - 1]
    print(f"{n_small} x 4 KiB dropped at once, {CONCURRENCY} uploads in flight")
    print(f"  ossyncd run (drop -> all done): {ours:8.0f} files/s")
    print(f"  bare oss2 thread pool (put only): {pool:6.0f} files/s   ratio {ours / pool:.2f} (target >= 1.0)")
    print(f"  CPU per file: ossyncd {ours_cpu:.2f} ms, the pool {pool_cpu:.2f} ms: ratio {ours_cpu / pool_cpu:.2f} "
          f"(the pool's cost per file / ours: {pool_cpu / ours_cpu:.2f})")
    print(f"detection latency close -> PutObject, settle_seconds={SETTLE}: p50 {p50 * 1000:.0f} ms, "
          f"p95 {p95 * 1000:.0f} ms (target <= {SETTLE * 1000 + 100:.0f} ms)")
    print(f"start-up rescan of {n_rescan} done files: scan {scan_s:.2f} s, start to scan done {scan_wall:.2f} s "
          f"(target <= 10 s), upload requests sent: {sent}")
    print(f"one {large_mib} MiB file renamed into the watch, to its `uploaded` line: {large:.1f} MiB/s "
          f"(the upload itself {large_line:.1f} MiB/s) vs curl -T {large_curl:.1f} MiB/s: ratio {large / large_curl:.2f} "
          f"(target >= 0.95)")


if __name__ == "__main__":
    main()
