"""Emulator: the `python -m tests.ossemu` command line."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import oss2
import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(30)
def test_cli_prints_json_serves_and_exits_on_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ossemu", "--data", str(tmp_path / "data"), "--port", "0",
         "--sts-port", "0", "--bucket", "drop", "--bucket", "other", "--min-duration", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        info = json.loads(proc.stdout.readline())
        assert set(info) == {"oss", "sts", "region", "proxy", "oss_endpoint", "sts_endpoint", "root", "user",
                             "role_arn", "full_role_arn", "oidc"}
        assert info["full_role_arn"].endswith(":role/uploader-full")
        assert set(info["oidc"]) == {"issuer", "provider_arn"}
        assert info["oidc"]["provider_arn"].startswith("acs:ram::")
        assert info["oss"].startswith("http://127.0.0.1:") and info["region"] == "cn-hangzhou"
        assert info["proxy"] == info["oss"] and info["oss_endpoint"] == "http://oss-cn-hangzhou.aliyuncs.com"
        assert info["sts_endpoint"] == "http://sts.cn-hangzhou.aliyuncs.com"
        assert info["role_arn"].startswith("acs:ram::") and info["role_arn"].endswith(":role/uploader")
        assert len(info["role_arn"].split(":")[3]) == 16
        auth = oss2.Auth(info["root"]["id"], info["root"]["secret"])
        for bucket in ("drop", "other"):
            b = oss2.Bucket(auth, info["oss"], bucket)
            b.put_object("hello", b"world")
            assert b.get_object("hello").read() == b"world"
        assert requests.get(info["oss"] + "/-/stats").json()["requests"]["PutObject"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == ""  # exactly one line on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
