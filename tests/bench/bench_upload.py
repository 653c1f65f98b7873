"""One large file: ossyncd vs oss2.resumable_upload vs curl, measured in the same run,
then `ossyncd upload` of a 1 GiB file as a whole command (process start to exit) vs
`curl -T` of it (target: >= 0.9x), plus ossyncd's peak RSS on a 2 GiB file.

The emulator runs in its own process. ossyncd runs as `ossyncd upload` (a subprocess,
start-up included); oss2.resumable_upload runs in this process, at its defaults and at
ossyncd's part size and thread count. Every object's CRC64 is checked.
Sizes: OSSYNCD_BENCH_UPLOAD_MIB (512), OSSYNCD_BENCH_WHOLE_MIB (1024), OSSYNCD_BENCH_RSS_MIB (2048).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import oss2

from tests.bench.bench_put import ROOT, MiB, curl_put, make_file, start_emulator, static_config

PART = 8 * MiB
THREADS = 4
REPS = int(os.environ.get("OSSYNCD_BENCH_REPS", "2"))


def write_config(tmp: Path, info: dict) -> Path:
    return static_config(tmp / "bench.toml", info, tmp / "state.db",
                         f"[upload]\npart_size = \"{PART // MiB}MiB\"\nparallel_parts = {THREADS}\n")


def run_ossyncd(cfg: Path, path: Path, key_prefix: str) -> tuple[float, float]:
    """(wall seconds including Python start-up, upload seconds from ossyncd's own log line)."""
    env = {**os.environ, "NO_PROXY": "127.0.0.1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "ossyncd", "upload", "-c", str(cfg), "--prefix", key_prefix, str(path)],
                       check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    line = next(json.loads(x) for x in r.stderr.splitlines() if x.startswith("{") and '"uploaded"' in x)
    return wall, line["seconds"]


def run_resumable(bucket, path: Path, key: str, tmp: Path, **kw) -> float:
    store = oss2.ResumableStore(root=str(tmp / "ckpt"))
    t0 = time.perf_counter()
    oss2.resumable_upload(bucket, key, str(path), store=store, **kw)
    return time.perf_counter() - t0


def peak_rss_mib(cfg: Path, path: Path) -> float:
    """Peak RSS of one `ossyncd upload`, measured by a fresh parent whose only child it is."""
    probe = ("import resource, subprocess, sys\n"
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "ossyncd", "upload", "-c", str(cfg),
                          "--prefix", "rss/", str(path)], check=True, cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "NO_PROXY": "127.0.0.1"})
    return int(out.stdout.strip()) / 1024


def main():
    size = int(os.environ.get("OSSYNCD_BENCH_UPLOAD_MIB", "512")) * MiB
    rss_size = int(os.environ.get("OSSYNCD_BENCH_RSS_MIB", "2048")) * MiB
    whole_size = int(os.environ.get("OSSYNCD_BENCH_WHOLE_MIB", "1024")) * MiB
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src.bin"
        want = make_file(src, size)
        proc, info = start_emulator(tmp / "data")
        try:
            bucket = oss2.Bucket(oss2.Auth(info["root"]["id"], info["root"]["secret"]), info["oss"], "drop")
            cfg = write_config(tmp, info)
            walls: list[float] = []

            def ours(i):
                wall, upload = run_ossyncd(cfg, src, f"o{i}/")
                walls.append(size / MiB / wall)
                return upload, f"o{i}/src.bin"
            runs = {
                "curl -T (ceiling)": lambda i: (curl_put(info, src, f"curl{i}")[0], f"curl{i}"),
                "ossyncd upload": ours,
                "resumable_upload (defaults)": lambda i: (run_resumable(bucket, src, f"r{i}", tmp), f"r{i}"),
                f"resumable_upload ({PART // MiB} MiB, {THREADS} threads)": lambda i: (
                    run_resumable(bucket, src, f"e{i}", tmp, part_size=PART, num_threads=THREADS), f"e{i}"),
            }
            speeds: dict[str, list[float]] = {k: [] for k in runs}
            for i in range(REPS):
                for name, fn in runs.items():
                    elapsed, key = fn(i)
                    assert bucket.head_object(key).server_crc == want, f"{name}: stored CRC64 mismatch"
                    bucket.delete_object(key)
                    speeds[name].append(size / MiB / elapsed)
            src.unlink()
            whole = {"ossyncd upload": [], "curl -T": []}   # seconds, process start to exit
            big = tmp / "whole.bin"
            want = make_file(big, whole_size)
            for i in range(REPS):
                whole["curl -T"].append(curl_put(info, big, f"wc{i}")[0])
                whole["ossyncd upload"].append(run_ossyncd(cfg, big, f"w{i}/")[0])
                for key in (f"wc{i}", f"w{i}/whole.bin"):
                    assert bucket.head_object(key).server_crc == want, f"{key}: stored CRC64 mismatch"
                    bucket.delete_object(key)
            big.unlink()
            sparse = tmp / "sparse.bin"
            with open(sparse, "wb") as f:
                f.truncate(rss_size)
            rss = peak_rss_mib(cfg, sparse)
        finally:
            proc.terminate()
            proc.wait(10)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    ours = med["ossyncd upload"]
    print(f"one {size // MiB} MiB file, median of {REPS}, emulator in its own process, CRC64 verified")
    print(f"{'client':<40}{'MiB/s':>8}{'ossyncd is':>14}")
    for name, v in med.items():
        ratio = "" if name == "ossyncd upload" else f"{ours / v:.2f}x"
        print(f"{name:<40}{v:>8.1f}{ratio:>14}")
    print(f"(ossyncd's rate is its upload time from its log line; as a whole command, Python start-up "
          f"included, it ran at {statistics.median(walls):.1f} MiB/s)")
    w_ours, w_curl = (statistics.median(whole[k]) for k in ("ossyncd upload", "curl -T"))
    print(f"one {whole_size // MiB} MiB file as a whole command, median of {REPS}: ossyncd upload {w_ours:.2f} s "
          f"({whole_size / MiB / w_ours:.1f} MiB/s), curl -T {w_curl:.2f} s ({whole_size / MiB / w_curl:.1f} MiB/s): "
          f"ratio {w_curl / w_ours:.2f}x (target >= 0.9x)")
    print(f"ossyncd peak RSS uploading a {rss_size // MiB} MiB file: {rss:.1f} MiB (target <= 80 MiB)")
    return med, rss


if __name__ == "__main__":
    main()
