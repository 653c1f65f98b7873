"""Start-up against peers measured in the same run, with and without PYTHONDONTWRITEBYTECODE=1:

1. `ossyncd status` on an empty state DB, process start to exit, vs `python -c pass`
   (targets: <= 0.25 s), and vs importing the libraries it is built on (click, pydantic,
   tomllib; a reader of the state DB uses plain sqlite3): what `status` takes beyond that is ours.
2. `ossyncd upload` of a small file, process start to its first request reaching a local
   listener (the endpoint; static credentials, so no STS call), vs `curl` to the same
   listener (target: <= 0.3 s), and vs two floors the design fixes: a bare
   `python -c "import oss2; ...put_object"` (oss2 must send the requests), and the same after
   importing the libraries `upload` is built on (structlog, pydantic, sqlite-utils, click, rich).
   What `upload` takes beyond the second floor is ours.
"Byte-code cache on" removes PYTHONDONTWRITEBYTECODE and points PYTHONPYCACHEPREFIX at a temp
dir (a first run writes it; the repo is never written); "PYTHONDONTWRITEBYTECODE=1" compiles our
modules from source at every start, as an editable install does with caching disabled
(pip-installed libraries keep their .pyc files).
Each figure is the median of OSSYNCD_BENCH_STARTS runs (default 9); the minimum is shown too.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.bench.bench_put import ROOT

RUNS = int(os.environ.get("OSSYNCD_BENCH_STARTS", "9"))


class FirstByte:
    """A listener that records when each connection's first byte arrives, then hangs up."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.arrived = threading.Event()
        self.at = 0.0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                if conn.recv(1):
                    self.at = time.perf_counter()
                    self.arrived.set()

    def time_to_first_byte(self, cmd: list[str], env: dict) -> float:
        self.arrived.clear()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if not self.arrived.wait(30):
                raise RuntimeError(f"no request from {cmd[:3]} within 30 s")
            return self.at - t0
        finally:
            proc.kill()
            proc.wait(10)


def wall(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def config(tmp: Path, port: int, name: str = "c") -> Path:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f"""
[oss]
endpoint = "http://127.0.0.1:{port}"
bucket = "drop"
signature = "v1"
[credentials]
source = "static"
access_key_id = "AKIDQUICKSTART"
access_key_secret = "quickstartsecret"
[state]
path = "{tmp / f'{name}.db'}"
[[watch]]
path = "{tmp / 'drop'}"
prefix = "in/"
""")
    os.chmod(cfg, 0o600)
    (tmp / "drop").mkdir(exist_ok=True)
    return cfg


def line(what: str, times: list[float], peer: str, peer_times: list[float], target: float) -> str:
    ours, theirs = statistics.median(times), statistics.median(peer_times)
    return (f"  {what}: median {ours:.3f} s (min {min(times):.3f}), {peer} {theirs:.3f} s, "
            f"difference {ours - theirs:+.3f} s, ratio {ours / theirs:.1f}x (target <= {target} s)")


STATUS_LIBRARIES = "import click, sqlite3, tomllib\nfrom pydantic import BaseModel"


def bare_put(port: int, libraries: bool) -> str:
    pre = "import structlog, pydantic, sqlite_utils, click, rich.progress\n" if libraries else ""
    return (f"{pre}import oss2\noss2.Bucket(oss2.Auth('AKIDQUICKSTART', 'quickstartsecret'), "
            f"'http://127.0.0.1:{port}', 'drop').put_object('in/x', b'x' * 4096)")


def main():
    curl = shutil.which("curl")
    with tempfile.TemporaryDirectory(prefix="bench-quickstart-") as tmp:
        tmp = Path(tmp)
        server = FirstByte()
        cfg = config(tmp, server.port)
        # status reads its own empty state DB: the killed uploads leave theirs with a file in flight
        status_cfg = config(tmp, server.port, "status")
        subprocess.run([sys.executable, "-m", "ossyncd", "retry", "-c", str(status_cfg)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        small = tmp / "small.bin"
        small.write_bytes(os.urandom(4096))
        ossyncd = [sys.executable, "-m", "ossyncd"]
        base = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
        cached = {"PYTHONPYCACHEPREFIX": str(tmp / "pycache")}
        for label, extra in (("byte-code cache on", cached), ("PYTHONDONTWRITEBYTECODE=1", {"PYTHONDONTWRITEBYTECODE": "1"})):
            env = {**base, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", **extra}
            wall([*ossyncd, "status", "-c", str(status_cfg)], env)   # with the cache on: writes it
            server.time_to_first_byte([*ossyncd, "upload", "-c", str(cfg), str(small)], env)
            for libraries in (False, True):
                server.time_to_first_byte([sys.executable, "-c", bare_put(server.port, libraries)], env)
            # the peers interleaved with ours, run by run: a load that comes and goes hits every figure alike
            cases = {
                "status": lambda: wall([*ossyncd, "status", "-c", str(status_cfg)], env),
                "bare": lambda: wall([sys.executable, "-c", "pass"], env),
                "status_libs": lambda: wall([sys.executable, "-c", STATUS_LIBRARIES], env),
                "first": lambda: server.time_to_first_byte([*ossyncd, "upload", "-c", str(cfg), str(small)], env),
                "floor": lambda: server.time_to_first_byte([sys.executable, "-c", bare_put(server.port, False)], env),
                "libs": lambda: server.time_to_first_byte([sys.executable, "-c", bare_put(server.port, True)], env),
            }
            if curl:
                cases["curl"] = lambda: server.time_to_first_byte(
                    [curl, "-s", "-m", "5", "-T", str(small), f"http://127.0.0.1:{server.port}/drop/x"], env)
            t: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(RUNS):
                for k, run in cases.items():
                    t[k].append(run())
            status, bare, first, floor, libs = t["status"], t["bare"], t["first"], t["floor"], t["libs"]
            print(f"{label}:")
            print(line("ossyncd status", status, "python -c pass", bare, 0.25))
            print(line("ossyncd status", status, "importing its libraries", t["status_libs"], 0.25))
            if curl:
                print(line("ossyncd upload, start to first request", first, "curl -T", t["curl"], 0.3))
            else:
                print(line("ossyncd upload, start to first request", first, "python -c pass", bare, 0.3))
            print(line("ossyncd upload, start to first request", first, "bare oss2 put_object", floor, 0.3))
            print(line("ossyncd upload, start to first request", first, "the same after importing upload's "
                       "libraries", libs, 0.3))
            print(line("floor: bare oss2 put_object, start to first request", floor, "python -c pass", bare, 0.3))
            print(flush=True)
        server.sock.close()


if __name__ == "__main__":
    main()
