"""Config loading: the interface keys, sizes, and errors that name the key and the fix."""

import subprocess
import sys
import textwrap

import pytest

from ossyncd.config import load_config, parse_size
from ossyncd.errors import ConfigError


def write(tmp_path, body: str):
    p = tmp_path / "ossyncd.toml"
    p.write_text(textwrap.dedent(body))
    return p


def base(tmp_path, extra: str = "", watch: str | None = None) -> str:
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    watch = watch if watch is not None else f'[[watch]]\npath = "{drop}"\nprefix = "incoming/"\n'
    return textwrap.dedent(f"""
        [oss]
        endpoint = "http://127.0.0.1:9000"
        bucket = "drop"
        region = "cn-hangzhou"
        [credentials]
        source = "static"
        access_key_id = "AKID"
        access_key_secret = "SECRET"
        [state]
        path = "{tmp_path / 'state.db'}"
        """) + extra + "\n" + watch


@pytest.mark.parametrize("text,expected", [
    ("8MiB", 8 * 1024**2), ("100KiB", 102400), ("1GiB", 1024**3), ("512", 512), (1234, 1234),
    ("1.5 MiB", int(1.5 * 1024**2)), ("0", 0),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["8 parsecs", "-1", "MiB", "", True])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_full_example_loads(tmp_path):
    cfg = load_config(write(tmp_path, base(tmp_path, '[upload]\nmultipart_threshold = "1MiB"\npart_size = "auto"\n')))
    assert cfg.upload.multipart_threshold == 1024**2
    assert cfg.upload.part_size is None
    assert cfg.watch[0].prefix == "incoming/" and cfg.watch[0].index == 0
    assert cfg.oss.signature == "v4"


def test_shipped_example_config_is_valid(tmp_path, monkeypatch):
    """config/ossyncd.example.toml documents every key; it must parse (paths swapped for tmp)."""
    from pathlib import Path
    import tomllib
    from ossyncd.config import parse_config
    data = tomllib.loads((Path(__file__).parent.parent / "config" / "ossyncd.example.toml").read_text())
    data["state"]["path"] = str(tmp_path / "state.db")
    for w in data["watch"]:
        w["path"] = str(tmp_path)
        w.pop("move_to", None)
        w["after_upload"] = "keep"
    monkeypatch.setenv("OSSYNCD_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("OSSYNCD_ACCESS_KEY_SECRET", "secret")
    parse_config(data)


@pytest.mark.parametrize("extra,watch,fragment", [
    ('[upload]\nmultipart_threshold = "8 parsecs"\n', None, "upload.multipart_threshold"),
    ('[upload]\npart_size = "10KiB"\n', None, "upload.part_size"),
    ('[upload]\nparalel_parts = 4\n', None, "upload.paralel_parts: unknown key"),
    ("", '[[watch]]\npath = "/nonexistent/drop"\n', "watch[0].path: /nonexistent/drop does not exist"),
    ("", '[[watch]]\npath = "relative/drop"\n', "watch[0].path"),
    ("", '[[watch]]\npath = "/tmp"\nafter_upload = "move"\n', "watch[0].move_to: required"),
    ("", '[[watch]]\npath = "/tmp"\nafter_upload = "shred"\n', "watch[0].after_upload"),
])
def test_errors_name_the_key(tmp_path, extra, watch, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, base(tmp_path, extra, watch)))
    assert fragment in str(e.value)


def test_sts_requires_role_and_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("OSSYNCD_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("OSSYNCD_ACCESS_KEY_SECRET", raising=False)
    text = base(tmp_path).replace('source = "static"', 'source = "sts"')
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert "credentials.role_arn: required" in str(e.value)


def test_keys_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSYNCD_ACCESS_KEY_ID", "ENVID")
    monkeypatch.setenv("OSSYNCD_ACCESS_KEY_SECRET", "ENVSECRET")
    text = base(tmp_path).replace('access_key_id = "AKID"\n', "").replace('access_key_secret = "SECRET"\n', "")
    cfg = load_config(write(tmp_path, text))
    assert cfg.credentials.access_key_id == "ENVID"


def test_v4_needs_region(tmp_path):
    text = base(tmp_path).replace('region = "cn-hangzhou"\n', "")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert "oss.region: required" in str(e.value)


def test_check_config_exits_2_on_bad_config(tmp_path):
    p = write(tmp_path, base(tmp_path, '[upload]\nparallel_parts = "many"\n'))
    r = subprocess.run([sys.executable, "-m", "ossyncd", "check-config", "-c", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "upload.parallel_parts" in r.stderr


def test_missing_config_file_says_what_to_do(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ossyncd", "status", "-c", str(tmp_path / "nope.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "config file not found" in r.stderr
