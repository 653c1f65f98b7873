"""A Debian container booted with systemd as PID 1 (systemd-nspawn -b), for tests/systemd.

The rootfs is built once with mmdebstrap and cached under .cache/systemd/ in the checkout,
keyed by suite, mirror and package list; each run boots a fresh copy of it. The container
shares the host's network (no --private-network), so it reaches the emulator on 127.0.0.1.
No system bus runs on the host, so the container is not registered with machined
(--register=no --keep-unit) and commands run in it through nsenter into its PID 1's
namespaces. See docs/systemd-test.md.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
CACHE = ROOT / ".cache" / "systemd"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# the list, plus what the README's steps call: procps (sysctl) and sudo
PACKAGES = ["systemd", "dbus", "python3", "python3-venv", "acl", "ca-certificates", "jq", "procps", "sudo"]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Unavailable(Exception):
    """This machine cannot boot a container; the message says why."""


def check_machine() -> None:
    if os.geteuid() != 0:
        raise Unavailable("systemd-nspawn needs root")
    for tool, pkg in (("mmdebstrap", "mmdebstrap"), ("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} not installed (apt-get install {pkg})")


def rootfs() -> Path:
    """The cached rootfs, built on first use (about 30 s from the Debian mirror)."""
    key = hashlib.sha256(f"{SUITE} {MIRROR} {' '.join(sorted(PACKAGES))}".encode()).hexdigest()[:12]
    target = CACHE / f"rootfs-{SUITE}-{key}"
    if (target / "usr" / "lib" / "systemd" / "systemd").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f"building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run(["mmdebstrap", "--variant=apt", "--include=" + ",".join(PACKAGES), SUITE, str(tmp), MIRROR],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"mmdebstrap failed ({r.returncode}):\n{r.stderr[-3000:]}")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def wheelhouse(dest: Path, src: Path) -> Path:
    """Wheels of the checkout copy `src`, its dependencies and its build backend, built on the
    host, so the container installs with no index."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(src), "setuptools>=77", "-w", str(dest)],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"pip wheel failed:\n{r.stderr[-3000:]}")
    shutil.rmtree(src / "build", ignore_errors=True)
    return dest


def copy_checkout(dest: Path) -> None:
    """The checkout as an operator has it (sources, README, config/, systemd/), no venv or caches."""
    ignore = shutil.ignore_patterns(".git", ".venv", ".cache", "__pycache__", "*.egg-info", ".pytest_cache",
                                    "node_modules", "build", "*.db")
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


class Container:
    def __init__(self, tree: Path, log: Path):
        self.tree = tree
        self.log_path = log
        self.proc: subprocess.Popen | None = None
        self.pid1 = 0

    def boot(self, timeout: float = 120) -> None:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-q", "-D", str(self.tree), "-b", "--register=no", "--keep-unit", "--console=pipe"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"systemd-nspawn exited {self.proc.returncode}:\n{self.output()[-2000:]}")
            self.pid1 = self._init_pid()
            if self.pid1:
                r = self.sh("systemctl is-system-running --wait", timeout=max(1.0, deadline - time.monotonic()),
                            check=False)
                if r.stdout.strip() in ("running", "degraded"):
                    return
                if r.returncode != 0 and "Failed to connect" not in r.stderr:
                    raise Unavailable(f"the container did not boot: {r.stdout}{r.stderr}\n{self.output()[-2000:]}")
            time.sleep(0.2)
        raise Unavailable(f"the container did not boot in {timeout}s:\n{self.output()[-2000:]}")

    def _init_pid(self) -> int:
        """The host pid of the container's PID 1: nspawn's child running systemd."""
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            for k in kids:
                if Path(f"/proc/{k}/comm").read_text().strip() == "systemd":
                    return int(k)
        except OSError:
            pass
        return 0

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def sh(self, script: str, *, timeout: float = 120, check: bool = True, env: dict | None = None,
           cwd: str = "/", input: str | None = None) -> subprocess.CompletedProcess:
        """`sh -c script` as root inside the container (its mount, pid, net, ipc, uts, cgroup
        namespaces and root), with a clean environment."""
        envs = [f"{k}={v}" for k, v in {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root", **(env or {})}.items()]
        r = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "-r", "--", "/usr/bin/env", "-i", *envs,
                            "/bin/sh", "-c", f"cd {cwd} && {script}"],
                           capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"in the container: {script!r} exited {r.returncode}\n"
                                 f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}")
        return r

    def path(self, inside: str) -> Path:
        """A path in the container as seen from the host (the same files)."""
        return self.tree / inside.lstrip("/")

    def shutdown(self, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)      # nspawn asks the container's systemd to power off
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
