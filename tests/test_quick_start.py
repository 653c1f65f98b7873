"""A quick start: each command imports what it needs (README "Quick start", docs/architecture.md
§15). The read-only commands import no SDK, no structlog, no sqlite-utils and (piped) no rich; `upload` and `run`
with static keys import no STS SDK, no credentials module they do not use, no broker and no
progress bars or tables they do not draw. No timings here: the modules loaded are the measure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ossyncd.state import State
from tests.helpers import write_config

HEAVY = ("rich", "structlog", "oss2", "aliyunsdkcore", "aliyunsdksts", "watchdog", "prometheus_client", "requests", "urllib3",
         "anycrc", "sqlite_utils", "concurrent.futures", "ossyncd.stack", "ossyncd.store", "ossyncd.uploader",
         "ossyncd.scheduler", "ossyncd.broker")
PROBE = """
import json, sys
from ossyncd.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules]}), file=sys.stderr)
"""
# What `upload` and `run` with static keys never use: the STS SDK and the other credential
# sources, the broker; and rich's progress bars (`upload` draws them, `run` never does; rich's
# console, traceback and table come with structlog's own import, whatever logs).
UNUSED_WITH_STATIC_KEYS = ("aliyunsdksts", "alibabacloud_credentials", "ossyncd.credentials.sts",
                           "ossyncd.credentials.profile", "ossyncd.credentials.chain", "ossyncd.credentials.process",
                           "ossyncd.broker", "configparser")
DAEMON_DRAWS_NOTHING = ("rich.progress", "rich.live")
# `run` until its first heartbeat is on disk (its loop is up): what it loaded by then; then SIGTERM
# (the daemon may leave through os._exit, so the probe reports before it stops it)
RUN_PROBE = """
import json, os, signal, sys, threading, time
from ossyncd.cli import main
health = sys.argv.pop()

def stop():
    deadline = time.monotonic() + 60
    while not os.path.exists(health) and time.monotonic() < deadline:
        time.sleep(0.05)
    print(json.dumps({"code": None, "loaded": [m for m in %r if m in sys.modules]}), file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=stop, daemon=True).start()
main(sys.argv[1:])
"""


def probe(script: str, modules: tuple[str, ...], *args) -> dict:
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    r = subprocess.run([sys.executable, "-c", script % (modules,), *map(str, args)], capture_output=True, text=True,
                       timeout=90, env=env)
    reports = [line for line in r.stderr.splitlines() if line.startswith('{"code": ')]
    assert reports, r.stderr[-3000:]
    return {**json.loads(reports[-1]), "stderr": r.stderr[-3000:]}


def static_keys(emulator) -> dict:
    root = emulator.info()["root"]
    return {"source": "static", "access_key_id": root["id"], "access_key_secret": root["secret"]}


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["list"]])
def test_read_only_commands_import_no_sdk(tmp_path, emulator, command):
    (tmp_path / "drop").mkdir()
    cfg = write_config(tmp_path / "c.toml", emulator, state=tmp_path / "state.db",
                       watches=[{"path": str(tmp_path / "drop"), "prefix": "in/"}])
    State(tmp_path / "state.db").close()   # a DB the daemon wrote: the command reads it
    got = probe(PROBE, HEAVY, *command, "-c", cfg)
    assert (got["code"], got["loaded"]) == (0, []), got


def test_upload_with_static_keys_imports_no_other_credentials(tmp_path, emulator):
    cfg = write_config(tmp_path / "c.toml", emulator, state=tmp_path / "state.db", credentials=static_keys(emulator))
    (tmp_path / "f.bin").write_bytes(b"x" * 100)
    got = probe(PROBE, UNUSED_WITH_STATIC_KEYS + ("oss2",), "upload", "-c", cfg, "--prefix", "in/", tmp_path / "f.bin")
    assert (got["code"], got["loaded"]) == (0, ["oss2"]), got   # oss2 did load: the upload really ran


def test_daemon_with_static_keys_imports_no_other_credentials_and_no_rendering(tmp_path, emulator):
    (tmp_path / "drop").mkdir()
    cfg = write_config(tmp_path / "c.toml", emulator, state=tmp_path / "state.db", credentials=static_keys(emulator),
                       watches=[{"path": str(tmp_path / "drop"), "prefix": "in/"}])
    got = probe(RUN_PROBE, UNUSED_WITH_STATIC_KEYS + DAEMON_DRAWS_NOTHING + ("ossyncd.scheduler",), "run", "-c", cfg,
                tmp_path / "state.db.health")
    assert got["loaded"] == ["ossyncd.scheduler"], got   # the daemon's loop did load


TRICKY = ["plain", "a[draft].txt", "[red]r[/red] [/b] [[watch]]", ":smile: :+1:", "bell\x07 bs\x08 vt\x0b ff\x0c cr\r end",
          "two\nlines", "wide 漢字 and é", "trailing space ", "  leading", "", "\x1b[31mansi\x1b[0m", "tab\tinside"]


@pytest.mark.parametrize("text", TRICKY)
def test_plain_console_prints_what_rich_prints_when_piped(monkeypatch, text):
    """Piped, output.Console writes without rich: byte for byte what rich wrote before."""
    import contextlib
    import io

    from rich.console import Console as RichConsole

    from ossyncd import output

    for var in ("TTY_COMPATIBLE", "FORCE_COLOR"):
        monkeypatch.delenv(var, raising=False)
    for obj in (text, output.styled(("label:", "red"), " ", text), output.styled(text).append(" x", style="red")):
        want = io.StringIO()
        RichConsole(file=want, soft_wrap=True, markup=False, emoji=False, highlight=False, width=100_000).print(obj)
        got = io.StringIO()
        console = output.Console(whole_values=True)
        with contextlib.redirect_stdout(got):
            console.print(obj)
        assert got.getvalue() == want.getvalue(), (obj, got.getvalue(), want.getvalue())
        assert console._rich is None or "\t" in text, "rich was loaded for plain text"
