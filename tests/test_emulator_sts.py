"""Emulator: STS AssumeRole through the real aliyun-python-sdk-sts client, plus hand-made RPC requests."""

import base64
import calendar
import hashlib
import hmac
import time
import uuid
from urllib.parse import quote, urlencode

import pytest
import requests
from aliyunsdkcore.acs_exception.exceptions import ServerException

pytestmark = pytest.mark.timeout(60)


def sts_error(fn, **kw):
    with pytest.raises(ServerException) as ei:
        fn(**kw)
    return ei.value


def rpc(emu, secret=None, key_id=None, timestamp=None, nonce=None, **extra):
    """An independently signed AssumeRole RPC request."""
    params = {"Action": "AssumeRole", "Version": "2015-04-01", "Format": "JSON", "RegionId": emu.region,
              "AccessKeyId": key_id or emu.user.id, "SignatureMethod": "HMAC-SHA1", "SignatureType": "",
              "SignatureVersion": "1.0", "SignatureNonce": nonce or uuid.uuid4().hex,
              "Timestamp": timestamp or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "RoleArn": emu.role_arn, "RoleSessionName": "manual", **extra}
    enc = lambda s: quote(str(s), safe="-_.~")  # noqa: E731
    canon = "&".join(f"{enc(k)}={enc(v)}" for k, v in sorted(params.items()))
    sts = "POST&%2F&" + enc(canon)
    key = ((secret or emu.user.secret) + "&").encode()
    params["Signature"] = base64.b64encode(hmac.new(key, sts.encode(), hashlib.sha1).digest()).decode()
    return requests.post(f"{emu.sts_url}/?{urlencode(params, quote_via=quote)}")


def test_assume_role_success(emulator, sts_credentials):
    before = time.time()
    c = sts_credentials(duration=900)
    exp = calendar.timegm(time.strptime(c["Expiration"], "%Y-%m-%dT%H:%M:%SZ"))
    assert before + 899 <= exp <= time.time() + 900  # rounded down, never later than the real expiry
    assert c["AccessKeyId"].startswith("STS.") and c["AccessKeySecret"] and c["SecurityToken"]
    tokens = {sts_credentials()["SecurityToken"] for _ in range(3)} | {c["SecurityToken"]}
    assert len(tokens) == 4
    assert emulator.stats()["sts_issued"] == 4 and emulator.stats()["requests"]["AssumeRole"] == 4
    # root may assume the role too
    assert sts_credentials(key_id=emulator.root.id, secret=emulator.root.secret)["AccessKeyId"].startswith("STS.")


def test_assume_role_errors(emulator, sts_credentials):
    e = sts_error(sts_credentials, secret="not-the-secret")
    assert e.get_error_code() in ("InvalidAccessKeySecret", "SignatureDoesNotMatch")
    assert e.get_error_code() == "InvalidAccessKeySecret"  # the SDK rewrites it when the STS matches
    e = sts_error(sts_credentials, key_id="LTAInoSuchUser000")
    assert (e.get_http_status(), e.get_error_code()) == (404, "InvalidAccessKeyId.NotFound")
    e = sts_error(sts_credentials, role_arn=emulator.role_arn.replace("uploader", "admin"))
    assert (e.get_http_status(), e.get_error_code()) == (404, "EntityNotExist.Role")
    e = sts_error(sts_credentials, role_arn="arn:aws:iam::1:role/x")
    assert e.get_error_code() == "InvalidParameter.RoleArn"
    for name in ("x", "has space", "a" * 65, "bad/slash"):
        e = sts_error(sts_credentials, session_name=name)
        assert e.get_error_code() == "InvalidParameter.RoleSessionName", name
    for duration in (0, 3601):
        e = sts_error(sts_credentials, duration=duration)
        assert e.get_error_code() == "InvalidParameter.DurationSeconds", duration
    for policy in ("{not json", '{"Statement": "nope"}', '{"Version":"1","Statement":[{"Effect":"Maybe",'
                   '"Action":"oss:*","Resource":"*"}]}', "x" * 2049):
        e = sts_error(sts_credentials, policy=policy)
        assert e.get_error_code() == "InvalidParameter.PolicyGrammar", policy
    assert emulator.stats()["sts_issued"] == 0


def test_min_duration_is_enforced(tmp_path):
    from tests.ossemu import Emulator

    with Emulator(str(tmp_path / "d")) as emu:  # default min_duration 900
        r = rpc(emu, DurationSeconds=899)
        assert r.status_code == 400 and r.json()["Code"] == "InvalidParameter.DurationSeconds"
        assert rpc(emu, DurationSeconds=900).status_code == 200


def test_rpc_details(emulator):
    r = rpc(emulator)
    assert r.status_code == 200, r.text
    assert set(r.json()) >= {"RequestId", "AssumedRoleUser", "Credentials"}
    nonce = uuid.uuid4().hex
    assert rpc(emulator, nonce=nonce).status_code == 200
    r = rpc(emulator, nonce=nonce)
    assert r.status_code == 400 and r.json()["Code"] == "SignatureNonceUsed"
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 20 * 60))
    r = rpc(emulator, timestamp=old)
    assert r.status_code == 400 and r.json()["Code"] == "InvalidTimeStamp.Expired"
    r = rpc(emulator, secret="wrong")
    body = r.json()
    assert r.status_code == 400 and body["Code"] == "SignatureDoesNotMatch"
    assert body["Message"].startswith("Specified signature is not matched with our calculation. "
                                      "server string to sign is:POST&%2F&")
    assert set(body) == {"RequestId", "HostId", "Code", "Message", "Recommend"}
    # STS credentials cannot assume the role again
    c = rpc(emulator).json()["Credentials"]
    r = rpc(emulator, key_id=c["AccessKeyId"], secret=c["AccessKeySecret"])
    assert r.status_code in (403, 404)


def test_timestamp_with_fractional_seconds(emulator):
    """STS takes ISO 8601 UTC with or without fractions (ali-oss sends toISOString()'s milliseconds)."""
    now = time.time()
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    for ts in (f"{whole}Z", f"{whole}.123Z", f"{whole}.5Z", f"{whole}.123456Z"):
        r = rpc(emulator, timestamp=ts)
        assert r.status_code == 200, (ts, r.text)
    old = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now - 20 * 60))
    assert rpc(emulator, timestamp=old).json()["Code"] == "InvalidTimeStamp.Expired"
    for bad in (f"{whole}", f"{whole}.Z", f"{whole}.123", f"{whole}+08:00", f"{whole}.12aZ",
                whole.replace("T", " ") + "Z", "2026-13-01T00:00:00Z", "1764611280", " "):
        r = rpc(emulator, timestamp=bad)
        assert r.status_code == 400 and r.json()["Code"] == "InvalidTimeStamp.Format", (bad, r.text)
