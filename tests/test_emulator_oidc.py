"""The emulator's AssumeRoleWithOIDC: anonymous, the JWT checked against the trusted test issuer."""

import json
import time

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

from tests.ossemu.oidc import TestIssuer


def call(emu, **over):
    form = {"Format": "JSON", "Version": "2015-04-01", "RoleArn": emu.role_arn,
            "OIDCProviderArn": emu.oidc.provider_arn, "OIDCToken": emu.oidc.token(ttl=60),
            "RoleSessionName": "pytest", "DurationSeconds": "900", **over}
    form = {k: v for k, v in form.items() if v is not None}
    return requests.post(emu.sts_url + "/?Action=AssumeRoleWithOIDC", data=form, timeout=10)


def test_oidc_success_counts_the_token(emulator, root_bucket):
    token = emulator.oidc.token(ttl=60)
    r = call(emulator, OIDCToken=token)
    assert r.status_code == 200, r.text
    creds = r.json()["Credentials"]
    assert creds["AccessKeyId"].startswith("STS.") and creds["SecurityToken"]
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    stats = emulator.stats()
    assert stats["oidc_tokens"] == {jti: 1}
    assert stats["ok"]["AssumeRoleWithOIDC"] == 1 and "AssumeRole" not in stats["ok"]


@pytest.mark.parametrize("case, status, code", [
    ("expired", 400, "AuthenticationFail.OIDCToken.Expired"),
    ("issuer", 400, "AuthenticationFail.OIDCToken.IssuerInvalid"),
    ("audience", 400, "AuthenticationFail.OIDCToken.AudienceInvalid"),
    ("foreign_key", 400, "AuthenticationFail.OIDCToken.Invalid"),
    ("garbage", 400, "AuthenticationFail.OIDCToken.Invalid"),
    ("no_sub", 400, "AuthenticationFail.OIDCToken.Invalid"),
    ("provider", 404, "EntityNotExist.OIDCProvider"),
    ("role", 404, "EntityNotExist.Role"),
    ("missing_token", 400, "MissingOIDCToken"),
])
def test_oidc_rejections(emulator, case, status, code):
    iss = emulator.oidc
    over = {
        "expired": {"OIDCToken": iss.token(exp=int(time.time()) - 5)},
        "issuer": {"OIDCToken": iss.token(iss="https://elsewhere.example/x")},
        "audience": {"OIDCToken": iss.token(aud="someone-else")},
        "foreign_key": {"OIDCToken": TestIssuer(issuer=iss.issuer).token()},
        "garbage": {"OIDCToken": "not-a-jwt"},
        "no_sub": {"OIDCToken": iss.token(sub="")},
        "provider": {"OIDCProviderArn": iss.provider_arn + "x"},
        "role": {"RoleArn": emulator.role_arn + "x"},
        "missing_token": {"OIDCToken": None},
    }[case]
    r = call(emulator, **over)
    assert (r.status_code, r.json()["Code"]) == (status, code), r.text
    assert emulator.stats()["errors"]["AssumeRoleWithOIDC"] == {code: 1}
    assert emulator.stats()["oidc_tokens"] == {}


def test_oidc_issuer_key_given_at_start(tmp_path):
    """The emulator can be started with the issuer key a test brings."""
    from tests.ossemu import Emulator

    key = ec.generate_private_key(ec.SECP256R1())
    with Emulator(str(tmp_path / "d"), oidc_issuer=TestIssuer(key=key), min_duration=1) as emu:
        assert call(emu, OIDCToken=TestIssuer(issuer=emu.oidc.issuer, key=key).token()).status_code == 200


def test_role_chaining_only_from_the_relay_role(emulator, sts_credentials):
    """A `relay` session may assume `uploader`; an `uploader` session may not (NoPermission)."""
    from aliyunsdkcore.acs_exception.exceptions import ServerException
    from aliyunsdkcore.auth.credentials import StsTokenCredential
    from aliyunsdkcore.client import AcsClient
    from aliyunsdksts.request.v20150401.AssumeRoleRequest import AssumeRoleRequest

    def assume_with(creds, arn):
        cred = StsTokenCredential(creds["AccessKeyId"], creds["AccessKeySecret"], creds["SecurityToken"])
        client = AcsClient(region_id=emulator.region, credential=cred, timeout=10, connect_timeout=5)
        req = AssumeRoleRequest()
        req.set_endpoint(emulator.sts_url)
        req.set_RoleArn(arn)
        req.set_RoleSessionName("chain")
        req.set_DurationSeconds(900)
        return json.loads(client.do_action_with_exception(req))["Credentials"]

    relay = sts_credentials(role_arn=emulator.relay_role_arn, duration=900)
    assert assume_with(relay, emulator.role_arn)["AccessKeyId"].startswith("STS.")
    uploader = sts_credentials(duration=900)
    with pytest.raises(ServerException) as ei:
        assume_with(uploader, emulator.role_arn)
    assert ei.value.get_error_code() == "NoPermission"
