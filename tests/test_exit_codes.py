"""One exit code per error, whichever command ends with it (errors.py draws the tree):
2 for a bad config (a [credentials] section that cannot build a source included), 1 for
everything else; stderr says `label: message` once, never a traceback."""

from __future__ import annotations

import os

import pytest

from tests.helpers import object_bytes, ossyncd, random_file, sts_credentials, write_config

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
