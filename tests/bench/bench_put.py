"""Single-stream PUT throughput against the emulator: curl (the ceiling) vs oss2.put_object_from_file.

The emulator runs as a subprocess so that its hashing does not compete with the client for
the GIL. One file of random data (OSSYNCD_BENCH_MIB, default 256 MiB) is uploaded
OSSYNCD_BENCH_REPS times (default 3) by each client; every upload's CRC64 is verified.
"""

import base64
import email.utils
import hashlib
import hmac
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anycrc

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
CRC = anycrc.Model("CRC64-XZ")


def start_emulator(data_dir):
    proc = subprocess.Popen([sys.executable, "-m", "tests.ossemu", "--data", str(data_dir), "--bucket", "drop"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return proc, json.loads(proc.stdout.readline())


def static_config(path, info, state, extra=""):
    """An ossyncd config using the emulator's root key (the peers use it too), V1 signatures."""
    path.write_text(f"""
[oss]
endpoint = "{info['oss']}"
bucket = "drop"
signature = "v1"
[credentials]
source = "static"
access_key_id = "{info['root']['id']}"
access_key_secret = "{info['root']['secret']}"
[state]
path = "{state}"
""" + extra)
    os.chmod(path, 0o600)
    return path


def make_file(path, size):
    crc = 0
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(16 * MiB, left))
            crc = CRC.calc(chunk, crc)
            f.write(chunk)
            left -= len(chunk)
    return crc


def curl_put(info, path, key, content_type="application/octet-stream"):
    date = email.utils.formatdate(usegmt=True)
    sts = f"PUT\n\n{content_type}\n{date}\n/drop/{key}".encode()
    sig = base64.b64encode(hmac.new(info["root"]["secret"].encode(), sts, hashlib.sha1).digest()).decode()
    cmd = ["curl", "-s", "-o", "/dev/null", "-D", "-", "-T", str(path), "-H", f"Date: {date}",
           "-H", f"Content-Type: {content_type}", "-H", f"Authorization: OSS {info['root']['id']}:{sig}",
           f"{info['oss']}/drop/{key}"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - t0
    block = [b for b in out.replace("\r", "").split("\n\n") if b.strip()][-1].splitlines()  # skip 100 Continue
    status = block[0].split(" ", 2)[1]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in block[1:])}
    assert status == "200", f"curl PUT failed: {out[:500]}"
    return elapsed, int(headers["x-oss-hash-crc64ecma"])


def oss2_put(bucket, path, key):
    t0 = time.perf_counter()
    r = bucket.put_object_from_file(key, str(path))
    return time.perf_counter() - t0, r.crc


def main():
    import oss2

    size = int(os.environ.get("OSSYNCD_BENCH_MIB", "256")) * MiB
    reps = int(os.environ.get("OSSYNCD_BENCH_REPS", "3"))
    with tempfile.TemporaryDirectory(prefix="bench-put-") as tmp:
        src = Path(tmp) / "src.bin"
        want = make_file(src, size)
        proc, info = start_emulator(Path(tmp) / "data")
        try:
            bucket = oss2.Bucket(oss2.Auth(info["root"]["id"], info["root"]["secret"]), info["oss"], "drop")
            results = {"curl": [], "oss2": []}
            for _ in range(reps):
                for name, fn in (("curl", lambda: curl_put(info, src, "bench/curl")),
                                 ("oss2", lambda: oss2_put(bucket, src, "bench/oss2"))):
                    elapsed, crc = fn()
                    assert crc == want, f"{name}: CRC64 {crc} != {want}"
                    key = f"bench/{name}"
                    assert bucket.head_object(key).server_crc == want, f"{name}: stored object CRC mismatch"
                    results[name].append(size / MiB / elapsed)
        finally:
            proc.terminate()
            proc.wait(10)
    rows = {name: (max(v), statistics.median(v)) for name, v in results.items()}
    print(f"PUT {size // MiB} MiB x {reps}, emulator in a subprocess, CRC64 verified on every upload")
    print(f"{'client':<28}{'best MiB/s':>12}{'median MiB/s':>14}")
    print(f"{'curl -T (raw PUT, ceiling)':<28}{rows['curl'][0]:>12.1f}{rows['curl'][1]:>14.1f}")
    print(f"{'oss2.put_object_from_file':<28}{rows['oss2'][0]:>12.1f}{rows['oss2'][1]:>14.1f}")
    print(f"{'ratio oss2/curl':<28}{rows['oss2'][0] / rows['curl'][0]:>12.2f}{rows['oss2'][1] / rows['curl'][1]:>14.2f}")
    return rows


if __name__ == "__main__":
    main()
