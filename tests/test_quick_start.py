"""A quick start: the read-only commands import no SDK and no structlog (README "Quick start")."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import write_config

HEAVY = ("structlog", "oss2", "aliyunsdkcore", "aliyunsdksts", "watchdog", "prometheus_client", "requests", "urllib3",
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
