"""`make demo` stops everything it started, whichever way its terminal ends it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from ossyncd.state import State
from tests.helpers import ROOT, random_file, wait_until


def gone(pid: int) -> bool:
    """No such process, or only its zombie (exited, not yet reaped by whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def refused(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return False
    except OSError:
        return True


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_demo_stops_the_daemon_and_the_emulator_on(sig, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}
    log = open(tmp_path / "demo.log", "w+")
    # its own session, like a terminal's job: the signal goes to the whole process group,
    # as closing the terminal (SIGHUP) or Ctrl-C (SIGINT) would send it
    demo = subprocess.Popen([sys.executable, "-m", "tests.demo", "--data", "data", "--drop", "drop",
                             "--oss-port", "0", "--sts-port", "0"], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    daemon_pid = None
    try:
        def started():
            m = re.search(r"OSS emulator\s+(\S+).*running on .* \(pid (\d+)\)", open(log.name).read(), re.S)
            return m and (m.group(1), int(m.group(2)))
        oss_url, daemon_pid = wait_until(started, 30, what=f"the demo banner ({log.name})")
        db = tmp_path / "data" / "state.db"
        wait_until(lambda: State.lock_holder(db) == daemon_pid, 30, what="the daemon running")
        random_file(tmp_path / "drop" / "hello.txt", 100, seed=1)   # in the checkout it would be ./drop
        os.killpg(demo.pid, sig)
        wait_until(lambda: demo.poll() is not None, 30, what="the demo exiting")
        wait_until(lambda: gone(daemon_pid), 10, what=f"the daemon (pid {daemon_pid}) gone")
        assert refused(oss_url), f"the emulator still answers on {oss_url}"
        assert "ossyncd and the emulator stopped" in open(log.name).read()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        if daemon_pid is not None and not gone(daemon_pid):   # left behind: do not leak it
            os.kill(daemon_pid, signal.SIGKILL)
        log.close()
