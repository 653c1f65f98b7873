"""One exit code per error, whichever command ends with it (errors.py draws the tree):
2 for a bad config (a [credentials] section that cannot build a source included), 1 for
everything else; stderr says `label: message` once, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ossyncd.policy import rrsa_trust_policy
from tests.helpers import ROOT, object_bytes, ossyncd, random_file, sts_credentials, write_config

pytestmark = pytest.mark.timeout(120)


def run_each(commands, config, tmp_path):
    out = {}
    for cmd in commands:
        args = [cmd, "-c", config] + ([str(tmp_path / "drop" / "f.bin")] if cmd == "upload" else [])
        r = ossyncd(*args, timeout=60)
        out[cmd] = r
        assert "Traceback" not in r.stderr, (cmd, r.stderr)
    return out


@pytest.fixture
def drop(tmp_path):
    random_file(tmp_path / "drop" / "f.bin", 1000, seed=1)
    return tmp_path / "drop"


def config(tmp_path, emulator, drop, **kw):
    kw.setdefault("state", tmp_path / "state.db")
    return write_config(tmp_path / "ossyncd.toml", emulator, watches=[{"path": str(drop), "prefix": "in/"}], **kw)


def test_a_bad_config_exits_2_everywhere(tmp_path, emulator, drop):
    cfg = config(tmp_path, emulator, drop, upload={"parallel_parts": "many"})
    for cmd, r in run_each(["run", "upload", "status", "check-config"], cfg, tmp_path).items():
        assert r.returncode == 2, (cmd, r.stderr)
        assert r.stderr.count("config error:") == 1 and "upload.parallel_parts" in r.stderr, (cmd, r.stderr)


def test_credentials_that_cannot_be_built_are_a_config_error(tmp_path, emulator, drop):
    cfg = config(tmp_path, emulator, drop, credentials=sts_credentials(emulator, sts_endpoint="http://127.0.0.1:99999"))
    for cmd, r in run_each(["run", "upload", "check-config"], cfg, tmp_path).items():
        assert r.returncode == 2, (cmd, r.stderr)
        assert "config error:" in r.stderr and "credentials.sts_endpoint" in r.stderr, (cmd, r.stderr)


def test_an_unusable_state_db_exits_1_everywhere(tmp_path, emulator, drop):
    (tmp_path / "state.db").mkdir()        # state.path names a directory
    cfg = config(tmp_path, emulator, drop)
    for cmd, r in run_each(["run", "upload", "status"], cfg, tmp_path).items():
        assert r.returncode == 1, (cmd, r.stderr)
        assert "state error:" in r.stderr and str(tmp_path / "state.db") in r.stderr, (cmd, r.stderr)


def test_credentials_refused_at_fetch_exit_1(tmp_path, emulator, drop):
    cfg = config(tmp_path, emulator, drop,
                 credentials=sts_credentials(emulator, access_key_secret="wrongSECRETwrongSECRET0000"))
    r = run_each(["check-config"], cfg, tmp_path)["check-config"]
    assert r.returncode == 1, r.stderr
    assert "credentials (sts):" in r.stderr and "the AccessKey secret is wrong" in r.stderr, r.stderr


def test_url_of_a_file_not_uploaded_exits_1_and_names_it(tmp_path, emulator, drop):
    cfg = config(tmp_path, emulator, drop)
    r = ossyncd("url", "-c", cfg, drop / "f.bin")
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert f"{drop / 'f.bin'}: not uploaded yet" in r.stderr, r.stderr


def test_upload_names_each_file_it_cannot_send_and_sends_the_rest(tmp_path, emulator, drop):
    cfg = config(tmp_path, emulator, drop)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = ossyncd("upload", "-c", cfg, drop / "f.bin", tmp_path / "missing.bin", fifo, timeout=60)
    assert r.returncode == 1, r.stderr
    assert f"{tmp_path / 'missing.bin'}: No such file or directory; nothing uploaded" in r.stderr, r.stderr
    assert f"{fifo}: not a regular file; nothing uploaded" in r.stderr, r.stderr
    assert "done" in r.stderr and object_bytes(emulator, "in/f.bin") == (drop / "f.bin").read_bytes()


def test_the_process_exit_keeps_the_code_and_every_byte_and_a_closed_pipe_is_exit_1(tmp_path):
    """cli.entry leaves with os._exit after flushing: the exit code, the answer written whole,
    and a reader that went away (`| head`) as exit 1 without a traceback."""
    arn, issuer = "acs:ram::1234567890123456:oidc-provider/ack-rrsa-c1", "https://oidc-ack-cn-hangzhou.oss.example/c1"
    r = ossyncd("policy", "--rrsa", "--oidc-provider-arn", arn, "--oidc-issuer", issuer, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == json.dumps(rrsa_trust_policy(arn, issuer, "default", "ossyncd"), indent=2) + "\n"
    r = ossyncd("status", "-c", tmp_path / "missing.toml", timeout=60)
    assert r.returncode == 2 and "missing.toml: config file not found" in r.stderr, r.stderr

    read, write = os.pipe()
    os.close(read)   # the reader is gone before the command writes a byte
    p = subprocess.run([sys.executable, "-m", "ossyncd", "--help"], stdout=write, stderr=subprocess.PIPE,
                       cwd=ROOT, timeout=60)
    os.close(write)
    assert p.returncode == 1 and p.stderr == b"", p
