"""The chain's links in-process: profile-file errors, the STS endpoint choice, the external
command's limits, the chain's memory and messages, AssumeRoleWithOIDC against the emulator."""

from __future__ import annotations

import json
import sys
import time

import jwt
import pytest

from ossyncd.config import parse_config
from ossyncd.credentials import build_source
from ossyncd.credentials.chain import DefaultChainSource
from ossyncd.credentials.context import LinkContext
from ossyncd.credentials.process import ProcessSource
from ossyncd.credentials.profile import cli_profile, ini_profile
from ossyncd.credentials.sts import OidcSource, StsSource, sts_endpoint
from ossyncd.errors import CredentialsError
from tests.ossemu.oidc import TestIssuer

SECRET = "pRoFiLeSeCrEt0123456789abcdef"


def ctx_for(tmp_path, **env) -> LinkContext:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return LinkContext(environ={"HOME": str(home), "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true", **env},
                       sts_endpoint="http://127.0.0.1:1", timeout=2.0)


def write_cli(ctx, doc) -> None:
    d = ctx.home() / ".aliyun"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))


def fails(fn, *needles, transient=None) -> CredentialsError:
    with pytest.raises(CredentialsError) as ei:
        fn()
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    assert SECRET not in msg and "\n" not in msg
    if transient is not None:
        assert ei.value.transient is transient, msg
    return ei.value


@pytest.mark.parametrize("profiles, needles", [
    ([{"name": "prod", "mode": "AK", "access_key_id": "LTAIx"}], ["lacks access_key_secret", "mode AK"]),
    ([{"name": "prod", "mode": "CloudSSO"}], ["mode 'CloudSSO' is not supported", "use one of AK, StsToken"]),
    ([{"name": "prod", "mode": "ChainableRamRoleArn", "source_profile": "prod", "ram_role_arn": "a"}],
     ["is its own source_profile"]),
    ([{"name": "prod", "mode": "ChainableRamRoleArn", "source_profile": "gone", "ram_role_arn": "a"}],
     ["profile 'gone' is not in ~/.aliyun/config.json (profiles: prod)"]),
    ([{"name": "prod", "mode": "External", "process_command": "get 'creds"}], ["cannot be split into words"]),
])
def test_cli_profile_errors_name_the_profile_and_the_fix(tmp_path, profiles, needles):
    ctx = ctx_for(tmp_path)
    write_cli(ctx, {"current": "prod", "profiles": profiles})
    fails(lambda: cli_profile(ctx), *needles, transient=False)


def test_cli_profile_without_current_and_broken_json(tmp_path):
    ctx = ctx_for(tmp_path)
    write_cli(ctx, {"profiles": []})
    fails(lambda: cli_profile(ctx), "names no \"current\" profile", "ALIBABA_CLOUD_PROFILE")
    write_cli(ctx, '{"current": "prod",\n "profiles": [\n  {"name": "prod", "access_key_secret": "' + SECRET + '",}]}')
    fails(lambda: cli_profile(ctx), "~/.aliyun/config.json is not valid JSON at line 3")


def test_ini_profile_errors_and_comments(tmp_path):
    ctx = ctx_for(tmp_path, ALIBABA_CLOUD_PROFILE="prod")
    d = ctx.home() / ".alibabacloud"
    d.mkdir()
    ini = d / "credentials.ini"
    ini.write_text(f"[default]\ntype = access_key\naccess_key_id = LTAIa\naccess_key_secret = {SECRET}\n")
    fails(lambda: ini_profile(ctx), "profile [prod] is not in ~/.alibabacloud/credentials.ini (sections: default)")
    ini.write_text("[prod]\ntype = rsa_key_pair\n")
    fails(lambda: ini_profile(ctx), "type 'rsa_key_pair' is not supported")
    ini.write_text(f"[prod]\ntype = access_key   # keys\naccess_key_id = LTAIa # the id\naccess_key_secret = {SECRET}\n")
    link = ini_profile(ctx)
    assert link.source.fetch().access_key_id == "LTAIa"
    assert link.description == "profile [prod] in ~/.alibabacloud/credentials.ini, type access_key"
    ini.write_text("no section header\n")
    fails(lambda: ini_profile(ctx), "is not a valid INI file at line 1")


def test_sts_endpoint_choice():
    assert sts_endpoint("http://127.0.0.1:9", environ={"ALIBABA_CLOUD_STS_ENDPOINT": "x"}) == "http://127.0.0.1:9"
    assert sts_endpoint(None, environ={"ALIBABA_CLOUD_STS_ENDPOINT": "sts.example.com"}) == "https://sts.example.com"
    env = {"ALIBABA_CLOUD_STS_REGION": "cn-beijing", "ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED": "true"}
    assert sts_endpoint(None, environ=env) == "https://sts-vpc.cn-beijing.aliyuncs.com"
    assert sts_endpoint(None, region="cn-shanghai", vpc=False, environ=env) == "https://sts.cn-shanghai.aliyuncs.com"
    assert sts_endpoint(None, environ={}) == "https://sts.aliyuncs.com"


def test_process_limits(tmp_path):
    script = tmp_path / "p.py"
    script.write_text("import subprocess, sys, time\n"
                      "mode = sys.argv[1]\n"
                      "if mode == 'fail': sys.stderr.write('denied for key LTAI5tVeryLongSecretLikeValue0\\n'); sys.exit(2)\n"
                      "if mode == 'bad': print('{\\n\"a\": 1,\\n}')\n"
                      "if mode == 'hang':\n"
                      "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                      "    time.sleep(60)\n"
                      "if mode == 'ok': print('{\"mode\": \"AK\", \"access_key_id\": \"LTAIp\", "
                      "\"access_key_secret\": \"" + SECRET + "\"}')\n")
    run = lambda mode, timeout=5.0: ProcessSource(command=[sys.executable, str(script), mode], timeout=timeout).fetch()  # noqa: E731
    e = fails(lambda: run("fail"), "exited with status 2", "denied for key <redacted>", transient=True)
    assert "LTAI5tVeryLong" not in str(e)
    fails(lambda: run("bad"), "printed no valid JSON at line 3", transient=False)
    t0 = time.monotonic()
    fails(lambda: run("hang", 1.0), "did not finish within 1s", transient=True)
    assert time.monotonic() - t0 < 5, "the command's children kept it waiting"
    fails(lambda: ProcessSource(command=[str(tmp_path / "nope")]).fetch(), "cannot be run", transient=False)
    snap = run("ok")
    assert snap.access_key_id == "LTAIp" and snap.expires_at is None and SECRET not in repr(snap)


def test_chain_messages_and_memory(tmp_path):
    ctx = ctx_for(tmp_path)
    fails(DefaultChainSource(ctx).fetch, "no credentials found in the default chain", "ALIBABA_CLOUD_ACCESS_KEY_ID")
    write_cli(ctx, {"current": "prod", "profiles": [{"name": "dev", "mode": "AK"}]})
    ctx2 = ctx_for(tmp_path, ALIBABA_CLOUD_CREDENTIALS_URI="http://127.0.0.1:1/creds")
    e = fails(DefaultChainSource(ctx2).fetch, "cli-profile link: profile 'prod' is not in",
              "(also tried: uri)", transient=True)
    assert e.code == "Profile"
    write_cli(ctx, {"current": "prod", "profiles": [{"name": "prod", "mode": "AK", "access_key_id": "LTAIc",
                                                      "access_key_secret": SECRET}]})
    chain = DefaultChainSource(ctx)
    assert chain.describe() == "default chain"
    assert chain.fetch().access_key_id == "LTAIc"
    assert chain.describe() == 'default: profile "prod" in ~/.aliyun/config.json, mode AK'
    (ctx.home() / ".aliyun" / "config.json").unlink()
    assert chain.fetch().access_key_id == "LTAIc", "the link that answered is remembered"


# --------------------------------------------------------------------------- against the emulator

def test_oidc_source_rereads_the_token_file_and_maps_rejections(tmp_path, emulator):
    tok = tmp_path / "token"
    src = OidcSource(role_arn=emulator.role_arn, oidc_provider_arn=emulator.oidc.provider_arn,
                     oidc_token_file=str(tok), endpoint=emulator.sts_url, duration_seconds=900)
    fails(src.fetch, f"OIDC token file {tok} does not exist", "ALIBABA_CLOUD_OIDC_TOKEN_FILE", transient=True)
    jtis = []
    for _ in range(2):
        t = emulator.oidc.token(ttl=60)
        jtis.append(jwt.decode(t, options={"verify_signature": False})["jti"])
        tok.write_text(t + "\n")
        assert src.fetch().security_token
    assert emulator.stats()["oidc_tokens"] == {j: 1 for j in jtis}
    foreign = TestIssuer(issuer=emulator.oidc.issuer).token()
    tok.write_text(foreign)
    e = fails(src.fetch, "AuthenticationFail.OIDCToken.Invalid", f"{tok} does not hold a token signed",
              transient=False)
    assert foreign not in str(e) and foreign[:20] not in str(e)
    tok.write_text(emulator.oidc.token(exp=int(time.time()) - 1))
    fails(src.fetch, "AuthenticationFail.OIDCToken.Expired", transient=True)


def test_wrapped_source_names_the_profile_when_sts_refuses_its_key(tmp_path, emulator, monkeypatch):
    """role_arn over a profile: AssumeRole signed with the profile's key; a wrong secret names the
    profile, not credentials.access_key_secret."""
    ctx = ctx_for(tmp_path)
    write_cli(ctx, {"current": "prod", "profiles": [{"name": "prod", "mode": "AK", "access_key_id": emulator.user.id,
                                                      "access_key_secret": SECRET}]})
    monkeypatch.setenv("HOME", str(ctx.home()))
    for var in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "OSS_ACCESS_KEY_ID", "ALIBABA_CLOUD_ROLE_ARN", "ALIBABA_CLOUD_PROFILE",
                "ALIBABA_CLOUD_CREDENTIALS_URI", "ALIBABA_CLOUD_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    cfg = parse_config({"oss": {"endpoint": emulator.oss_url, "bucket": "drop", "region": emulator.region},
                        "credentials": {"source": "profile", "role_arn": emulator.role_arn,
                                        "sts_endpoint": emulator.sts_url, "duration_seconds": 900},
                        "state": {"path": str(tmp_path / "s.db")}})
    src = build_source(cfg.credentials, bucket="drop", prefixes=[""])
    assert isinstance(src, StsSource)
    assert src.describe() == (f'profile "prod" in ~/.aliyun/config.json, mode AK, then AssumeRole '
                              f'{emulator.role_arn}')
    fails(src.fetch, "check the access_key_secret of profile \"prod\" in ~/.aliyun/config.json", transient=False)


@pytest.mark.parametrize("creds, needle", [
    ({"source": "oidc", "role_arn": "acs:ram::1:role/r"}, "credentials.oidc_provider_arn: required with source = \"oidc\""),
    ({"source": "process"}, "credentials.command: required with source = \"process\""),
    ({"source": "uri"}, "credentials.url: required with source = \"uri\""),
    ({"source": "uri", "url": "ftp://x"}, "credentials.url: 'ftp://x' is not an http(s) URL"),
    ({"source": "default", "policy": "{not json"}, "credentials.policy: is not valid JSON"),
])
def test_new_source_keys_are_checked(tmp_path, creds, needle):
    from ossyncd.errors import ConfigError
    with pytest.raises(ConfigError) as ei:
        parse_config({"oss": {"endpoint": "http://127.0.0.1:1", "bucket": "drop", "region": "cn-hangzhou"},
                      "credentials": creds, "state": {"path": str(tmp_path / "s.db")}})
    assert needle in str(ei.value), str(ei.value)


def test_left_out_credentials_mean_the_default_chain(tmp_path):
    cfg = parse_config({"oss": {"endpoint": "http://127.0.0.1:1", "bucket": "drop", "region": "cn-hangzhou"},
                        "state": {"path": str(tmp_path / "s.db")}})
    assert cfg.credentials.source == "default"
    assert isinstance(build_source(cfg.credentials, bucket="drop", prefixes=[""]), DefaultChainSource)
