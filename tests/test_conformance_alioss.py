"""Conformance: the ali-oss Node SDK (pinned in tests/conformance/package.json) against the emulator.

For V1 and V4 signatures, direct (endpoint = the emulator's IP; ali-oss then still sends
`Host: BUCKET.oss-<region>.aliyuncs.com`) and through the emulator as an HTTP forward proxy with
the real endpoint names: STS.assumeRole with the user key, put, multipartUpload cancelled and
resumed from the progress checkpoint, every object read back byte-equal with the root key.
"""

import json
import os
import shutil
import subprocess

import pytest

from tests.helpers import ROOT, MiB, random_file

pytestmark = pytest.mark.timeout(240)
CONFORMANCE = ROOT / "tests" / "conformance"
SCRIPT = "alioss.js"


def _pinned_installed(modules):
    pins = json.loads((CONFORMANCE / "package.json").read_text())["dependencies"]
    for name, version in pins.items():
        try:
            if json.loads((modules / name / "package.json").read_text())["version"] != version:
                return False
        except (OSError, ValueError, KeyError):
            return False
    return True


@pytest.fixture(scope="session")
def alioss_dir(tmp_path_factory):
    """A directory holding alioss.js beside node_modules with the pinned packages: tests/conformance
    when `npm ci --prefix tests/conformance` (.ci/run) installed them, else a fresh `npm ci` in a tmp dir."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed (apt-get install nodejs npm); the ali-oss conformance test needs it")
    if _pinned_installed(CONFORMANCE / "node_modules"):
        return CONFORMANCE
    npm = shutil.which("npm")
    assert npm, "node is installed but npm is not: apt-get install npm, then npm ci --prefix tests/conformance"
    d = tmp_path_factory.mktemp("alioss")
    for name in ("package.json", "package-lock.json", SCRIPT):
        shutil.copy(CONFORMANCE / name, d / name)
    r = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--prefix", str(d)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"npm ci of tests/conformance/package-lock.json in {d} failed:\n{r.stderr[-3000:]}"
    return d


def run_alioss(alioss_dir, cfg):
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    r = subprocess.run(["node", SCRIPT, json.dumps(cfg)], cwd=alioss_dir, capture_output=True, text=True,
                       timeout=180, env=env)
    lines = r.stdout.strip().splitlines()
    assert lines, f"alioss.js printed nothing (exit {r.returncode}):\n{r.stderr[-3000:]}"
    out = json.loads(lines[-1])
    assert r.returncode == 0 and out["ok"], f"ali-oss failed: {out}\nstderr:\n{r.stderr[-3000:]}"
    return out


@pytest.mark.parametrize("route", ["direct", "proxy"])
@pytest.mark.parametrize("sig", ["v1", "v4"])
def test_alioss_sts_put_multipart_cancel_resume(alioss_dir, emulator, root_bucket, tmp_path, sig, route):
    small = random_file(tmp_path / "small.txt", 3000, seed=1)
    big = random_file(tmp_path / "big.bin", 6 * MiB + 12345, seed=2)
    proxy = route == "proxy"
    prefix = f"alioss/{sig}-{route}/ü +/"
    cfg = {"oss": emulator.oss_endpoint if proxy else emulator.oss_url,
           "sts": emulator.sts_endpoint if proxy else emulator.sts_url,
           "proxy": emulator.oss_url if proxy else None,
           "region": f"oss-{emulator.region}", "bucket": "drop", "user": emulator.info()["user"],
           "role_arn": emulator.role_arn, "v4": sig == "v4", "prefix": prefix,
           "small": str(tmp_path / "small.txt"), "big": str(tmp_path / "big.bin"),
           "part_size": 1 * MiB, "cancel_after": 2}
    out = run_alioss(alioss_dir, cfg)

    assert out["parts_total"] == 7 and out["parts_before_cancel"] >= 2
    assert out["parts_resumed"] == 7 - out["parts_before_cancel"], out   # resumed, not restarted
    assert root_bucket.get_object(prefix + "small.txt").read() == small
    assert root_bucket.get_object(prefix + "big.bin").read() == big
    objects = {o["key"]: o for o in emulator.objects("drop")}
    assert objects[prefix + "big.bin"]["type"] == "Multipart" and objects[prefix + "big.bin"]["etag"].endswith("-7")
    assert emulator.uploads() == []                    # the resumed upload id was completed
    stats = emulator.stats()
    assert stats["requests"]["AssumeRole"] == 1 and stats["requests"]["InitiateMultipartUpload"] == 1
    # nothing ali-oss sent was refused; only a part in flight at cancel() may be cut off, or land
    # after the resumed upload completed (NoSuchUpload, rightly)
    assert set(stats["errors"]) <= {"UploadPart"}, stats["errors"]
    late = {"ConnectionReset", "ClientGone", "NoSuchUpload"}
    assert set(stats["errors"].get("UploadPart", {})) <= late, stats["errors"]
