"""systemd integration: the unit file (verify, security score), sd_notify (READY, WATCHDOG,
STATUS, STOPPING), clean stop and resume, the watchdog's stuck-loop rule, the unit's
MemoryDenyWriteExecute against this Python, and JSON logs for journald."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import MiB, fast_upload, json_lines, object_bytes, random_file, wait_until

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "ossyncd.service"
BROKER_UNIT = ROOT / "systemd" / "ossyncd-broker.service"
SYSCTL = ROOT / "systemd" / "99-ossyncd-inotify.conf"
MAX_EXPOSURE = 2.5


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze") or ("/usr/bin/systemd-analyze" if os.path.exists("/usr/bin/systemd-analyze") else None)
    if path is None:
        pytest.skip("systemd-analyze not installed (CI installs the `systemd` package)")
    return path


def unit_for_verify(tmp_path: Path, unit: Path = UNIT) -> Path:
    """The shipped unit with ExecStart pointing at this venv's `ossyncd`: verify checks that
    the binary exists and is executable, and /usr/local/bin/ossyncd is the install-time path.
    Nothing else is changed."""
    exe = Path(sys.executable).parent / "ossyncd"
    assert exe.exists(), f"{exe}: install the package (pip install -e .)"
    text = unit.read_text()
    assert re.search(r"^ExecStart=/usr/local/bin/ossyncd (broker )?run ", text, re.M)
    out = tmp_path / unit.name
    out.write_text(text.replace("ExecStart=/usr/local/bin/ossyncd ", f"ExecStart={exe} "))
    return out


def verify(unit: Path) -> tuple[int, list[str]]:
    r = subprocess.run([systemd_analyze(), "verify", "--man=no", str(unit)], capture_output=True, text=True,
                       timeout=60)
    # verify reports unknown keys and bad values as warnings with exit code 0: count them too
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if unit.name in line]
    return r.returncode, complaints


# ------------------------------------------------------------------------ the unit file

@pytest.mark.timeout(60)
def test_unit_verifies_and_a_broken_copy_does_not(tmp_path):
    unit = unit_for_verify(tmp_path)
    rc, complaints = verify(unit)
    assert rc == 0 and complaints == [], complaints
    # the check is not vacuous: a typo'd key and a bad value are reported
    bad = tmp_path / "bad" / "ossyncd.service"
    bad.parent.mkdir()
    bad.write_text(re.sub(r"^ProtectSystem=strict$", "ProtectSystem=stricter\nProtectSytem=yes", unit.read_text(),
                          flags=re.M))
    _, complaints = verify(bad)
    assert len(complaints) == 2, complaints


@pytest.mark.timeout(60)
def test_unit_settings_and_security_exposure(tmp_path):
    text = UNIT.read_text()
    settings = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            settings.setdefault(k, []).append(v)
    for key, value in {"Type": "notify", "ExecReload": "/bin/kill -HUP $MAINPID", "Restart": "on-failure",
                       "WatchdogSec": "30", "TimeoutStopSec": "30", "User": "ossyncd", "Group": "ossyncd",
                       "StateDirectory": "ossyncd", "ConfigurationDirectory": "ossyncd",
                       "RuntimeDirectory": "ossyncd", "EnvironmentFile": "-/etc/ossyncd/credentials.env",
                       "ProtectSystem": "strict", "MemoryDenyWriteExecute": "yes", "CapabilityBoundingSet": "",
                       "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "UMask": "0077"}.items():
        assert settings.get(key) == [value], (key, settings.get(key))
    assert "StartLimitIntervalSec" in settings and "StartLimitBurst" in settings
    r = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager", str(unit_for_verify(tmp_path))],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout)
    assert m, r.stdout + r.stderr
    score = float(m.group(1))
    print(f"systemd-analyze security exposure: {score}")
    assert score <= MAX_EXPOSURE, r.stdout


@pytest.mark.timeout(60)
def test_broker_unit_verifies_with_notify_and_exposure(tmp_path):
    unit = unit_for_verify(tmp_path, BROKER_UNIT)
    rc, complaints = verify(unit)
    assert rc == 0 and complaints == [], complaints
    settings: dict[str, list[str]] = {}
    for line in BROKER_UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            settings.setdefault(k, []).append(v)
    for key, value in {"Type": "notify", "ExecStart": "/usr/local/bin/ossyncd broker run -c /etc/ossyncd/broker.toml",
                       "Restart": "on-failure", "RestartPreventExitStatus": "2", "User": "ossyncd-broker",
                       "StateDirectory": "ossyncd-broker", "ProtectSystem": "strict", "PrivateUsers": "yes",
                       "MemoryDenyWriteExecute": "yes", "CapabilityBoundingSet": "", "UMask": "0077"}.items():
        assert settings.get(key) == [value], (key, settings.get(key))
    r = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout)
    assert m, r.stdout + r.stderr
    print(f"systemd-analyze security exposure (broker): {m.group(1)}")
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout


@pytest.mark.timeout(30)
def test_sysctl_dropin_names_real_inotify_limits():
    values = {}
    for line in SYSCTL.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            k, _, v = line.partition("=")
            values[k.strip()] = int(v.strip())
    assert values["fs.inotify.max_user_watches"] >= 524288
    assert values["fs.inotify.max_user_instances"] >= 512
    for key in values:      # each key is a real kernel tunable
        assert Path("/proc/sys", *key.split(".")).exists(), key


# ------------------------------------------------------------------------ sd_notify

class NotifySocket:
    """The systemd side of sd_notify: an AF_UNIX datagram socket (abstract namespace)."""

    def __init__(self):
        self.name = f"@ossyncd-test-{os.getpid()}-{secrets.token_hex(4)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []    # (monotonic time, line)
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self._lock:
                self.messages += [(now, line) for line in data.decode().splitlines()]

    def lines(self, prefix: str = "", since: float = 0.0) -> list[tuple[float, str]]:
        with self._lock:
            return [(t, m) for t, m in self.messages if m.startswith(prefix) and t >= since]

    def wait_for(self, line: str, timeout: float, since: float = 0.0) -> float:
        """The time of the first `line` received at or after `since`."""
        return wait_until(lambda: [t for t, m in self.lines(line, since) if m == line], timeout,
                          what=f"sd_notify {line}")[0]

    def wait_ready(self, daemon, timeout: float = 30) -> float:
        """READY=1 from a daemon process that must stay alive meanwhile (fail fast with its log)."""
        def ready():
            assert daemon.proc.poll() is None, f"daemon exited before READY=1:\n{daemon.output()[-3000:]}"
            return [t for t, m in self.lines("READY=1") if m == "READY=1"]
        return wait_until(ready, timeout, what="sd_notify READY=1")[0]

    def env(self, watchdog_usec: int | None = 2_000_000) -> dict:
        env = {"NOTIFY_SOCKET": self.name}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def close(self):
        self._stop = True
        self.sock.close()


@pytest.fixture
def notify_socket(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)   # pings are meant for us, whatever the pid
    ns = NotifySocket()
    yield ns
    ns.close()






@pytest.mark.timeout(60)
def test_broker_notifies_ready_once_listening_and_stopping_on_sigterm(tmp_path, emulator, notify_socket):
    from tests.broker_helpers import Broker

    b = Broker(tmp_path, emulator)
    b.start(env=notify_socket.env(watchdog_usec=None))
    try:
        notify_socket.wait_for("READY=1", 30)
        assert b.request("/healthz")[0] == 200
        assert [m for _, m in notify_socket.lines("STATUS=")] == [f"STATUS=serving on {b.url}"]
        t_term = time.monotonic()
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(10) == 0
        assert notify_socket.lines("STOPPING=1", since=t_term)
    finally:
        b.stop()


@pytest.mark.timeout(90)
def test_notify_ready_watchdog_status_then_clean_stop_and_resume(tmp_path, emulator, daemon_factory, notify_socket):
    drop = tmp_path / "drop"
    drop.mkdir()
    part = 1 * MiB
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}],
                upload=fast_upload(part_size="1MiB", multipart_threshold=1 * MiB, parallel_parts=4))
    d.start(env=notify_socket.env())
    ready_at = notify_socket.wait_ready(d)
    # READY comes after the watches exist: a file dropped at once is picked up
    small = random_file(drop / "first.txt", 3000, seed=1)
    d.wait_states({"done": 1}, 30)
    assert object_bytes(emulator, "first.txt") == small

    # watchdog pings at half of WATCHDOG_USEC (2 s) while the loop ticks; STATUS every 2 s
    t0 = time.monotonic()
    time.sleep(4.2)
    pings = notify_socket.lines("WATCHDOG=1", since=t0)
    assert 3 <= len(pings) <= 6, pings
    statuses = [m for _, m in notify_socket.lines("STATUS=", since=ready_at)]
    assert len(statuses) >= 2 and any("done 1" in s for s in statuses), statuses

    # SIGTERM while a multipart upload is in flight: STOPPING=1, exit 0, checkpoints kept
    emulator.set_faults([{"op": "UploadPart", "delay_ms": 500}])
    big = random_file(drop / "big.bin", 24 * MiB, seed=2)
    wait_until(lambda: emulator.stats()["requests"].get("UploadPart", 0) >= 6, 30, what="parts in flight")
    t_term = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    stop_seconds = time.monotonic() - t_term
    print(f"stop with a multipart upload in flight: {stop_seconds:.2f} s")
    d.log.close()
    assert notify_socket.lines("STOPPING=1", since=t_term)
    assert emulator.stats()["requests"].get("CompleteMultipartUpload", 0) == 0
    assert d.files("queued")[0]["path"].endswith("big.bin")

    # restart without the fault: the upload continues from its recorded parts
    emulator.clear_faults()
    d.start(env=notify_socket.env())
    d.wait_states({"done": 2}, 60)
    assert object_bytes(emulator, "big.bin") == big
    stats = emulator.stats()
    assert stats["bytes_received"] <= len(small) + len(big) + 4 * part, stats
    assert stats["requests"]["InitiateMultipartUpload"] == 1 and stats["uploads_open"] == 0
    assert d.stop() == 0

    # journald gets JSON lines (stdout is not a TTY), with one canonical "uploaded" line per file
    events = json_lines(d.output())
    uploaded = [e for e in events if e["event"] == "uploaded"]
    assert sorted(Path(e["path"]).name for e in uploaded) == ["big.bin", "first.txt"], uploaded
    for e in uploaded:
        assert {"path", "key", "size", "mode", "parts", "seconds", "mib_s", "url", "level", "timestamp"} <= set(e)
        assert e["url"].endswith("/drop/" + e["key"])
    byname = {Path(e["path"]).name: e for e in uploaded}
    assert byname["big.bin"]["mode"] == "multipart" and byname["big.bin"]["size"] == len(big)
    assert 0 < byname["big.bin"]["parts"] < 24          # only the parts not sent before the stop
    assert byname["first.txt"]["mode"] == "simple" and byname["first.txt"]["parts"] == 1


@pytest.mark.timeout(60)
def test_watchdog_pings_stop_while_the_loop_is_stuck(tmp_path, emulator, daemon_factory, notify_socket):
    """End to end: a real stall. Another process holds the state DB's write lock, so the
    scheduler loop blocks inside tick() (SQLite busy wait); the pings must stop within the
    watchdog period and come back once the lock is released."""
    drop = tmp_path / "drop"
    drop.mkdir()
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}])
    d.start(env=notify_socket.env())
    notify_socket.wait_ready(d)
    time.sleep(2.5)
    db = sqlite3.connect(str(tmp_path / "state.db"), timeout=5, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    t_lock = time.monotonic()
    time.sleep(7)
    pings = [t - t_lock for t, _ in notify_socket.lines("WATCHDOG=1", since=t_lock)]
    db.execute("ROLLBACK")
    db.close()
    t_unlock = time.monotonic()
    # allowed: pings until the loop's next write (<= 1 s) plus one watchdog period (2 s)
    assert all(p < 3.6 for p in pings), pings
    notify_socket.wait_for("WATCHDOG=1", 5, since=t_unlock)
    data = random_file(drop / "after.txt", 100, seed=3)
    d.wait_states({"done": 1}, 30)
    assert object_bytes(emulator, "after.txt") == data
    assert d.stop() == 0


class _Recorder:
    def __init__(self, interval, enabled=True):
        self.watchdog_interval = interval
        self.enabled = enabled
        self.sent: list[str] = []

    def send(self, *lines):
        self.sent += lines


@pytest.mark.timeout(30)
def test_status_line_is_not_counted_without_systemd():
    """STATUS= counts the whole table (tens of ms at a million rows): only when systemd listens."""
    from ossyncd.app import Daemon as AppDaemon

    app = AppDaemon(None)
    app.notifier = _Recorder(None, enabled=False)
    app.scheduler = SimpleNamespace(last_tick=1000.0, paused=False, throughput=0.0)
    calls = []
    app.stack = SimpleNamespace(state=SimpleNamespace(counts=lambda: calls.append(1) or {"done": 3}))
    for t in (1000.5, 1003.0, 1010.0):
        app._supervise_step(t)
    assert calls == [] and app.notifier.sent == []


@pytest.mark.timeout(30)
def test_supervise_step_pings_only_while_the_loop_ticks():
    """The decision itself, driven with a fake clock and a fake scheduler.last_tick."""
    from ossyncd.app import Daemon as AppDaemon

    app = AppDaemon(None)
    app.notifier = _Recorder(15.0)                     # WatchdogSec=30 -> ping every 15 s
    app.scheduler = SimpleNamespace(last_tick=1000.0, paused=False, throughput=0.0)
    app.stack = SimpleNamespace(state=SimpleNamespace(counts=lambda: {"done": 3}))
    pings = lambda: app.notifier.sent.count("WATCHDOG=1")

    app._supervise_step(1000.5)
    assert pings() == 1 and any(m.startswith("STATUS=") and "done 3" in m for m in app.notifier.sent)
    app._supervise_step(1010.0)                        # not yet half a period since the last ping
    assert pings() == 1
    app.scheduler.last_tick = 1015.0
    app._supervise_step(1016.0)
    assert pings() == 2
    # the loop stops ticking at 1015: pings continue for one watchdog period (30 s) at most
    app._supervise_step(1031.0)
    assert pings() == 3
    app._supervise_step(1046.0)                        # 31 s without a tick: stuck
    assert pings() == 3
    app._supervise_step(1070.0)
    assert pings() == 3
    app.scheduler.last_tick = 1070.0                   # it recovered
    app._supervise_step(1070.5)
    assert pings() == 4
    # no watchdog configured: never a ping, status still flows
    app.notifier = _Recorder(None)
    app._supervise_step(2000.0)
    assert app.notifier.sent.count("WATCHDOG=1") == 0


# ------------------------------------------------------------------------ MemoryDenyWriteExecute

MDWE_RUNNER = r"""
# prctl(PR_SET_MDWE = 65, PR_MDWE_REFUSE_EXEC_GAIN = 1), then run the daemon in this process
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(77)
try:   # the guard is really on: writable+executable memory is refused
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit(78)
except OSError:
    pass
sys.argv = ["ossyncd", "run", "-c", sys.argv[1]]
from ossyncd.cli import main
main()
"""


@pytest.mark.timeout(60)
def test_daemon_runs_under_memory_deny_write_execute(tmp_path, emulator, daemon_factory):
    """The unit sets MemoryDenyWriteExecute=yes. The kernel's own equivalent (prctl PR_SET_MDWE,
    Linux >= 6.3; systemd >= 254 uses it too) is applied to the daemon process here, and a
    simple and a multipart upload, STS refresh, the metrics endpoint and shutdown must work."""
    probe = subprocess.run([sys.executable, "-c", "import ctypes,sys; sys.exit(ctypes.CDLL(None).prctl(65,1,0,0,0) != 0)"])
    if probe.returncode != 0:
        pytest.skip("kernel lacks PR_SET_MDWE (Linux < 6.3)")
    drop = tmp_path / "drop"
    drop.mkdir()
    files = {"s.txt": random_file(drop / "s.txt", 5000, seed=1), "m.bin": random_file(drop / "m.bin", 3 * MiB, seed=2)}
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}], metrics={"listen": "127.0.0.1:0"})
    d.log = open(d.log_path, "ab")
    d.proc = subprocess.Popen([sys.executable, "-c", MDWE_RUNNER, str(d.config)], stdout=d.log,
                              stderr=subprocess.STDOUT, env={**os.environ, "NO_PROXY": "127.0.0.1"})
    d.wait_states({"done": 2}, 40)
    for k, v in files.items():
        assert object_bytes(emulator, k) == v
    m = wait_until(lambda: re.search(r'"url": "(http://127\.0\.0\.1:\d+/metrics)"', d.output()), 10, what="metrics url")
    import urllib.request
    body = urllib.request.urlopen(m.group(1), timeout=10).read().decode()
    assert "ossyncd_uploads_completed_total 2.0" in body
    assert d.stop() == 0, d.output()[-2000:]
