"""A quick start: the read-only commands import no SDK and no structlog (README "Quick start")."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import write_config

HEAVY = ("rich", "structlog", "oss2", "aliyunsdkcore", "aliyunsdksts", "watchdog", "prometheus_client", "requests", "urllib3",
         "anycrc", "concurrent.futures", "ossyncd.stack", "ossyncd.store", "ossyncd.uploader",
         "ossyncd.scheduler", "ossyncd.broker")
PROBE = """
import json, sys
from ossyncd.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["list"]])
def test_read_only_commands_import_no_sdk(tmp_path, emulator, command):
    (tmp_path / "drop").mkdir()
    cfg = write_config(tmp_path / "c.toml", emulator, state=tmp_path / "state.db",
                       watches=[{"path": str(tmp_path / "drop"), "prefix": "in/"}])
    r = subprocess.run([sys.executable, "-c", PROBE, *command, "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    probe = json.loads(r.stderr.strip().splitlines()[-1])
    assert probe == {"code": 0, "loaded": []}, (probe, r.stdout, r.stderr)


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
