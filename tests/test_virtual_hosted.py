"""The daemon and the CLI configured with the real endpoint names, reaching the emulator as an HTTP
forward proxy (HTTP_PROXY), so that oss2 sends what production sends: virtual-hosted requests
(`Host: drop.oss-cn-hangzhou.aliyuncs.com`, the key alone in the path) and STS to sts.<region>."""

from pathlib import Path
from urllib.parse import unquote, urlsplit

import oss2
import pytest
import requests

from tests.helpers import MiB, list_json, ossyncd, random_file, write_config

pytestmark = pytest.mark.timeout(120)


def named(emu) -> dict:
    """Config sections with the endpoint names instead of the emulator's IP URLs."""
    user = emu.info()["user"]
    return {"oss": {"endpoint": emu.oss_endpoint, "region": emu.region},
            "credentials": {"source": "sts", "access_key_id": user["id"], "access_key_secret": user["secret"],
                            "role_arn": emu.role_arn, "sts_endpoint": emu.sts_endpoint,
                            "sts_region": emu.region, "duration_seconds": 900}}


def root_static(emu) -> dict:
    # the upload role cannot read (least privilege); a signed GET URL needs a key that can
    return {"source": "static", "access_key_id": emu.root.id, "access_key_secret": emu.root.secret}


def proxies(emu) -> dict:
    return {"http": emu.oss_url}


def fetch_recorded(emu, url: str) -> bytes:
    """GET a recorded object URL through the proxy, with the root key in the Authorization header
    (the bucket is private): the URL's host and path must name the object on their own."""
    u = urlsplit(url)
    assert u.hostname == "drop.oss-cn-hangzhou.aliyuncs.com", url
    req = oss2.http.Request("GET", url)
    oss2.Auth(emu.root.id, emu.root.secret)._sign_request(req, "drop", unquote(u.path[1:]))
    r = requests.get(url, headers=dict(req.headers), proxies=proxies(emu), timeout=10)
    assert r.status_code == 200, r.text
    return r.content


def fetch_signed(emu, config: Path, path: Path) -> bytes:
    r = ossyncd("url", "--sign", "-c", config, path, env=emu.proxy_env())
    assert r.returncode == 0, r.stderr
    url, = r.stdout.splitlines()   # stdout is the URL alone: log lines go to stderr
    assert url.startswith("http://drop.oss-cn-hangzhou.aliyuncs.com/"), url
    got = requests.get(url, proxies=proxies(emu), timeout=10)
    assert got.status_code == 200, got.text
    return got.content


@pytest.mark.parametrize("signature", ["v1", "v4"])
def test_daemon_uploads_virtual_hosted_through_the_proxy(tmp_path, emulator, daemon_factory, root_bucket,
                                                         signature):
    drop = tmp_path / "drop"
    drop.mkdir()
    sections = named(emulator)
    sections["oss"]["signature"] = signature
    d = daemon_factory([{"path": str(drop), "prefix": "in/"}], **sections).start(env=emulator.proxy_env())
    files = {"small file.txt": random_file(drop / "small file.txt", 5000, seed=1),
             "sub/big ü.bin": random_file(drop / "sub" / "big ü.bin", 3 * MiB + 7, seed=2)}
    d.wait_states({"done": 2}, timeout=60)

    rows = {r["key"]: r for r in d.files()}
    for name, data in files.items():
        assert root_bucket.get_object("in/" + name).read() == data
        assert fetch_recorded(emulator, rows["in/" + name]["url"]) == data
    types = {o["key"]: o["type"] for o in emulator.objects("drop")}
    assert types == {"in/small file.txt": "Normal", "in/sub/big ü.bin": "Multipart"}
    assert emulator.stats()["sts_issued"] >= 1                           # STS came through the proxy
    signing = write_config(tmp_path / "sign.toml", emulator, state=d.db, credentials=root_static(emulator),
                           oss={**sections["oss"]})
    assert fetch_signed(emulator, signing, drop / "sub" / "big ü.bin") == files["sub/big ü.bin"]
    assert d.stop() == 0


def test_upload_command_and_urls_through_the_proxy(tmp_path, emulator, root_bucket):
    sections = named(emulator)
    state = tmp_path / "state.db"
    config = write_config(tmp_path / "ossyncd.toml", emulator, state=state, watches=[],
                          credentials=sections["credentials"], oss=sections["oss"],
                          upload={"multipart_threshold": 1 * MiB, "part_size": "256KiB"})
    data = random_file(tmp_path / "report a+b.bin", 2 * MiB + 3, seed=3)
    r = ossyncd("upload", "-c", config, "--prefix", "cli/", tmp_path / "report a+b.bin", env=emulator.proxy_env())
    assert r.returncode == 0, r.stderr
    assert root_bucket.get_object("cli/report a+b.bin").read() == data
    (row,) = list_json(config)
    assert row["state"] == "done" and row["url"] == "http://drop.oss-cn-hangzhou.aliyuncs.com/cli/report%20a%2Bb.bin"
    assert fetch_recorded(emulator, row["url"]) == data
    signing = write_config(tmp_path / "sign.toml", emulator, state=state, credentials=root_static(emulator),
                           oss=sections["oss"])
    assert fetch_signed(emulator, signing, tmp_path / "report a+b.bin") == data
