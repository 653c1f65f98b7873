"""Shared helpers for tests that run ossyncd against the emulator."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

import oss2

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):   # an inline table
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def write_config(path: Path, emu, *, state: Path, watches=(), credentials: dict | None = None,
                 upload: dict | None = None, oss: dict | None = None, daemon: dict | None = None,
                 metrics: dict | None = None) -> Path:
    """A config pointing at the emulator. Default credentials: STS through the emulator's
    upload-only role, so every test runs with the least privilege the product promises."""
    creds = credentials if credentials is not None else sts_credentials(emu)
    sections = {
        "oss": {"endpoint": emu.oss_url, "bucket": "drop", "region": emu.region, "signature": "v4", **(oss or {})},
        "credentials": creds,
        "upload": upload or {},
        "state": {"path": str(state)},
        "daemon": daemon or {},
        "metrics": metrics or {},
    }
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]   # None: left out
    for w in watches:
        lines.append("[[watch]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in w.items()]
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path


def sts_credentials(emu, **extra) -> dict:
    user = emu.info()["user"]
    return {"source": "sts", "access_key_id": user["id"], "access_key_secret": user["secret"],
            "role_arn": emu.role_arn, "sts_endpoint": emu.sts_url, "sts_region": emu.region,
            "duration_seconds": 900, **extra}


def root_bucket(emu) -> oss2.Bucket:
    root = emu.info()["root"]
    return oss2.Bucket(oss2.Auth(root["id"], root["secret"]), emu.oss_url, "drop")


def random_file(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def object_bytes(emu, key: str) -> bytes:
    return root_bucket(emu).get_object(key).read()


def ossyncd(*args, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           **kw.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "ossyncd", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def spawn_ossyncd(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           **kw.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "ossyncd", *map(str, args)], env=env,
                            stdout=kw.pop("stdout", subprocess.PIPE), stderr=kw.pop("stderr", subprocess.PIPE), **kw)


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def json_lines(text: str) -> list[dict]:
    """The daemon's log, one JSON object per line; anything else is a failure."""
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"not a JSON log line: {line!r}") from None
    return out


def events(d: "Daemon", name: str) -> list[dict]:
    """The daemon's log lines whose event is `name`."""
    return [e for e in json_lines(d.output()) if e.get("event") == name]


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page as {"name{labels}": value}."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def list_json(config: Path, state: str | None = None) -> list[dict]:
    args = ["list", "-c", config, "--json"] + (["--state", state] if state else [])
    r = ossyncd(*args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


class Daemon:
    """`ossyncd run` as a subprocess, its stdout+stderr captured to a file. `name` lets
    several daemons (each with its own config, state DB and log) share one tmp dir."""

    def __init__(self, tmp_path: Path, emu, watches: list[dict], *, name: str | None = None, **sections):
        self.tmp = tmp_path
        self.emu = emu
        self.db = tmp_path / (f"{name}-state.db" if name else "state.db")
        self.config = write_config(tmp_path / (f"{name}.toml" if name else "ossyncd.toml"), emu, state=self.db,
                                   watches=watches, **sections)
        self.proc: subprocess.Popen | None = None
        self.log_path = tmp_path / (f"{name}.log" if name else "daemon.log")

    def start(self, env: dict | None = None):
        self.log = open(self.log_path, "ab")
        self.proc = spawn_ossyncd("run", "-c", self.config, stdout=self.log, stderr=subprocess.STDOUT,
                                  env=env or {})
        return self

    def stop(self, sig=signal.SIGTERM, timeout=15) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        if hasattr(self, "log"):
            self.log.close()
        return self.proc.returncode if self.proc else 0

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict:
        r = ossyncd("status", "-c", self.config, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def files(self, state=None) -> list[dict]:
        return list_json(self.config, state)

    def wait_states(self, expected: dict[str, int], timeout: float):
        def ok():
            counts = self.status()["counts"]
            assert self.proc.poll() is None, self.output()[-3000:]
            return all(counts.get(s, 0) == n for s, n in expected.items())
        wait_until(ok, timeout, interval=0.3, what=f"states {expected} (log: {self.log_path})")


def bucket_keys(emu) -> list[str]:
    return sorted(o.key for o in oss2.ObjectIterator(root_bucket(emu)))


def fast_upload(**kw):
    return {"multipart_threshold": 1 * MiB, "part_size": "256KiB", "parallel_parts": 4,
            "max_files_in_flight": 4, "retry_backoff": 0.05, "retry_backoff_max": 0.2,
            "file_retry_delay": 1.0, "file_retry_delay_max": 2.0, **kw}


class LoopbackServer:
    """A test's own HTTP server on 127.0.0.1 (port 0: any free one), served from a thread."""

    def __init__(self, handler, port: int = 0):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
