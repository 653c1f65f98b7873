"""`ossyncd broker run` as a subprocess against the emulator's STS, like helpers.Daemon."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from tests.helpers import json_lines, ossyncd, spawn_ossyncd, toml_value, wait_until


def free_port() -> int:
    """A free port below the kernel's ephemeral range, so that a broker restarted on it is not
    refused because some client connection on the busy machine took it meanwhile."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) \
        if Path("/proc/sys/net/ipv4/ip_local_port_range").exists() else 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def write_broker_config(path: Path, emu, *, state: Path, broker: dict | None = None,
                        credentials: dict | None = None, oss: dict | None = None) -> Path:
    """The broker signs AssumeRole with the emulator's `user` key (it may only assume roles)."""
    user = emu.info()["user"]
    sections = {
        "broker": {"listen": f"127.0.0.1:{free_port()}", "role_arn": emu.role_arn, "state": str(state),
                   "max_duration": 900, "client_rate_limit": 50.0, **(broker or {})},
        "credentials": credentials if credentials is not None else {
            "source": "static", "access_key_id": user["id"], "access_key_secret": user["secret"],
            "sts_endpoint": emu.sts_url, "sts_region": emu.region, "timeout_seconds": 5.0},
        "oss": {"endpoint": emu.oss_url, "bucket": "drop", "region": emu.region, **(oss or {})},
    }
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


class Broker:
    def __init__(self, tmp: Path, emu, *, name: str = "broker", **sections):
        self.tmp = tmp
        self.emu = emu
        self.db = tmp / f"{name}.db"
        self.config = write_broker_config(tmp / f"{name}.toml", emu, state=self.db, **sections)
        self.log_path = tmp / f"{name}.log"
        self.audit_path = tmp / "audit.jsonl"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30, env: dict | None = None) -> "Broker":
        self._log = open(self.log_path, "ab")
        seen = len(self.listening())
        self.proc = spawn_ossyncd("broker", "run", "-c", self.config, stdout=self._log, stderr=subprocess.STDOUT,
                                  env=env or {})

        def up():
            assert self.proc.poll() is None, self.output()[-3000:]
            lines = self.listening()
            return lines[-1]["url"] if len(lines) > seen else None
        self.url = wait_until(up, timeout, what=f"broker listening (log: {self.log_path})")
        return self

    def listening(self) -> list[dict]:
        return [e for e in self.log_lines() if e.get("event") == "broker.listening"]

    def stop(self, sig=signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        if hasattr(self, "_log"):
            self._log.close()
        return self.proc.returncode if self.proc else None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict]:
        return json_lines(self.output())

    def audit(self) -> list[dict]:
        return json_lines(self.audit_path.read_text()) if self.audit_path.exists() else []

    def cli(self, *args, check: bool = True, inprocess: bool = True) -> subprocess.CompletedProcess:
        """`ossyncd broker CMD -c CONFIG ARGS...`. In-process (click's runner: the real command,
        without ~0.5 s of interpreter start-up) unless `inprocess=False`; the broker subprocess
        sees its changes through the registry file either way."""
        argv = ["broker", str(args[0]), "-c", str(self.config), *map(str, args[1:])]
        if inprocess:
            from click.testing import CliRunner

            from ossyncd.cli import main
            res = CliRunner().invoke(main, argv, catch_exceptions=False)
            r = subprocess.CompletedProcess(argv, res.exit_code, res.stdout, res.stderr)
        else:
            r = ossyncd(*argv)
        if check:
            assert r.returncode == 0, r.stderr
        return r

    def add_client(self, name: str, *prefixes: str, **opts) -> str:
        extra = [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]
        r = self.cli("add-client", name, *[x for p in prefixes for x in ("--prefix", p)], *extra)
        return r.stdout.strip()

    def request(self, path: str, *, token: str | None = None, data: bytes | None = None) -> tuple[int, dict, dict]:
        """(status, headers, JSON body or {})."""
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                body = r.read()
                return r.status, dict(r.headers), json.loads(body) if body else {}
        except urllib.error.HTTPError as e:
            body = e.read()
            return e.code, dict(e.headers), json.loads(body) if body else {}

    def daemon_credentials(self, token: str) -> dict:
        """A daemon's [credentials] for this broker."""
        return {"source": "broker", "broker_url": f"{self.url}/v1/credentials", "broker_token": token,
                "timeout_seconds": 5.0, "retry_backoff": 0.2, "retry_backoff_max": 1.0}
