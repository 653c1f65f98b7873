"""The official credential chain end to end (`source = "default"` and the explicit profile / oidc /
process / uri sources): ossyncd as a subprocess with HOME and the environment set by the test,
the emulator's STS (AssumeRole, AssumeRoleWithOIDC), and the instance metadata service and the
credentials URI as tiny local HTTP servers. Nothing leaves the loopback: the chain's metadata link
is either pointed at a local server or disabled with ALIBABA_CLOUD_ECS_METADATA_DISABLED=true."""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler

import jwt
import pytest

from tests.helpers import LoopbackServer, events, fast_upload, object_bytes, ossyncd, random_file, wait_until, write_config
from tests.ossemu.oidc import TestIssuer
from tests.test_sts_rotation import auth_errors, issued_secrets

# every variable the chain reads: cleared for each run, so the host's own never leak in
CHAIN_VARS = (
    "ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_SECURITY_TOKEN",
    "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN", "OSSYNCD_ACCESS_KEY_ID",
    "OSSYNCD_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_ROLE_ARN", "ALIBABA_CLOUD_OIDC_PROVIDER_ARN",
    "ALIBABA_CLOUD_OIDC_TOKEN_FILE", "ALIBABA_CLOUD_ROLE_SESSION_NAME", "ALIBABA_CLOUD_PROFILE",
    "ALIBABA_CLOUD_CLI_PROFILE_DISABLED", "ALIBABA_CLOUD_CREDENTIALS_FILE", "ALIBABA_CLOUD_ECS_METADATA",
    "ALIBABA_CLOUD_CREDENTIALS_URI", "ALIBABA_CLOUD_STS_REGION", "ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED",
    "ALIBABA_CLOUD_STS_ENDPOINT",
)


# --------------------------------------------------------------------------- local servers

class LocalServer:
    """A loopback HTTP server whose replies the test sets: IMDS (IMDSv2 token required) or a URI."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict]] = []
        self.doc: dict | None = None        # the credentials document
        self.status = 200
        self.body: bytes | None = None      # a raw body overriding doc
        self.role = "ecs-uploader"
        self.token = "imds-session-" + "x" * 20
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, status, body, ctype="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                outer.requests.append(("PUT", self.path, dict(self.headers)))
                if self.path == "/latest/api/token" and self.headers.get("X-aliyun-ecs-metadata-token-ttl-seconds"):
                    return self._reply(200, outer.token.encode(), "text/plain")
                self._reply(400, b"{}")

            def do_GET(self):
                outer.requests.append(("GET", self.path, dict(self.headers)))
                if self.path.startswith("/latest/meta-data/"):
                    if self.headers.get("X-aliyun-ecs-metadata-token") != outer.token:
                        return self._reply(401, b"", "text/plain")   # hardened mode (IMDSv2 only)
                    base = "/latest/meta-data/ram/security-credentials/"
                    if self.path == base:
                        return self._reply(200, outer.role.encode(), "text/plain")
                    if self.path != base + outer.role:
                        return self._reply(404, b"", "text/plain")
                if outer.body is not None or outer.status != 200:
                    return self._reply(outer.status, outer.body or b"{}")
                self._reply(200, json.dumps(outer.doc).encode())

        self.http = LoopbackServer(H)
        self.url = self.http.url

    def close(self):
        self.http.close()


@pytest.fixture
def local():
    servers = []

    def make():
        s = LocalServer()
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


# --------------------------------------------------------------------------- the setting

class Chain:
    """HOME, profile files, environment and a config with `[credentials] source = "default"`."""

    def __init__(self, tmp_path, emu, sts_credentials):
        self.tmp, self.emu, self.assume = tmp_path, emu, sts_credentials
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.env = {v: "" for v in CHAIN_VARS}
        self.env.update(HOME=str(self.home), ALIBABA_CLOUD_ECS_METADATA_DISABLED="true")
        self.creds: dict = {"source": "default", "sts_endpoint": emu.sts_url, "duration_seconds": 900,
                            "retry_backoff": 0.2, "retry_backoff_max": 1.0}
        self.outputs: list[str] = []
        self.oidc_tokens: list[str] = []

    # the emulator's identities
    def root(self):
        return {"access_key_id": self.emu.root.id, "access_key_secret": self.emu.root.secret}

    def user(self):
        return {"access_key_id": self.emu.user.id, "access_key_secret": self.emu.user.secret}

    def sts(self):
        c = self.assume(duration=900)
        return {"access_key_id": c["AccessKeyId"], "access_key_secret": c["AccessKeySecret"],
                "sts_token": c["SecurityToken"], "expiration": c["Expiration"]}

    def token_file(self, name="token", ttl=600):
        path = self.tmp / name
        tok = self.emu.oidc.token(ttl=ttl)
        self.oidc_tokens.append(tok)
        path.write_text(tok)
        return str(path)

    def cli_config(self, profiles, current="prod"):
        d = self.home / ".aliyun"
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps({"current": current, "profiles": profiles}, indent=2))

    def ini(self, sections: dict, name="default"):
        d = self.home / ".alibabacloud"
        d.mkdir(exist_ok=True)
        text = "".join(f"[{sec}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items()) for sec, kv in sections.items())
        (d / "credentials.ini").write_text(text)

    def config(self, name="ossyncd"):
        return write_config(self.tmp / f"{name}.toml", self.emu, state=self.tmp / f"{name}.db",
                            credentials=self.creds)

    def run(self, *args, timeout=60):
        r = ossyncd(*args, env=self.env, timeout=timeout)
        self.outputs += [r.stdout, r.stderr]
        return r

    def upload(self, key, size=300 * 1024, seed=1):
        f = self.tmp / "out" / key
        data = random_file(f, size, seed)
        r = self.run("upload", "-c", self.config(), f)
        assert r.returncode == 0, r.stdout + r.stderr
        assert object_bytes(self.emu, key) == data
        return r

    def resolved(self, r) -> str:
        for line in r.stderr.splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == "credentials.chain_resolved":
                return e["link"]
        raise AssertionError(f"no credentials.chain_resolved event in: {r.stderr[-2000:]}")

    def secrets(self) -> dict[str, str]:
        out = {"root secret": self.emu.root.secret, "user secret": self.emu.user.secret}
        for i, s in enumerate(issued_secrets(self.emu)):
            out[f"issued #{i}"] = s
        for i, t in enumerate(self.oidc_tokens):
            out[f"oidc token #{i}"] = t
        return out

    def assert_no_secrets(self, *more: str):
        blob = "\n".join(self.outputs + list(more))
        for what, secret in self.secrets().items():
            assert secret not in blob and secret[:20] not in blob, f"{what} found in the output"


@pytest.fixture
def chain(tmp_path, emulator, sts_credentials):
    return Chain(tmp_path, emulator, sts_credentials)


def external_script(chain, doc) -> str:
    script = chain.tmp / "get-creds.py"
    script.write_text("import json, sys\n"
                      "sys.stderr.write('fetching credentials\\n')\n"
                      f"print(json.dumps({json.dumps({'mode': 'StsToken', **doc})}))\n")
    return f"{sys.executable} {script}"


def imds_doc(chain):
    c = chain.assume(duration=900)
    return {"Code": "Success", "AccessKeyId": c["AccessKeyId"], "AccessKeySecret": c["AccessKeySecret"],
            "SecurityToken": c["SecurityToken"], "Expiration": c["Expiration"], "LastUpdated": "x"}


# --------------------------------------------------------------------------- 1. each link uploads

def _setup(link, chain, local):
    """Prepare one link; returns (expected description, expected emulator ok-counts or {})."""
    emu = chain.emu
    if link == "env-alibaba":
        chain.env.update(ALIBABA_CLOUD_ACCESS_KEY_ID=emu.root.id, ALIBABA_CLOUD_ACCESS_KEY_SECRET=emu.root.secret)
        return "default: environment ALIBABA_CLOUD_ACCESS_KEY_ID", {}
    if link == "env-oss":
        s = chain.sts()
        chain.env.update(OSS_ACCESS_KEY_ID=s["access_key_id"], OSS_ACCESS_KEY_SECRET=s["access_key_secret"],
                         OSS_SESSION_TOKEN=s["sts_token"])
        return "default: environment OSS_ACCESS_KEY_ID", {}
    if link == "oidc-env":
        chain.env.update(ALIBABA_CLOUD_ROLE_ARN=emu.role_arn, ALIBABA_CLOUD_OIDC_PROVIDER_ARN=emu.oidc.provider_arn,
                         ALIBABA_CLOUD_OIDC_TOKEN_FILE=chain.token_file())
        return "default: OIDC token file", {"AssumeRoleWithOIDC": 1}
    prod = {"name": "prod"}
    if link == "cli-AK":
        chain.cli_config([{**prod, "mode": "AK", **chain.root()}])
    elif link == "cli-StsToken":
        chain.cli_config([{**prod, "mode": "StsToken", **chain.sts()}])
    elif link == "cli-RamRoleArn":
        chain.cli_config([{**prod, "mode": "RamRoleArn", **chain.user(), "ram_role_arn": emu.role_arn,
                           "expired_seconds": 900}])
        return 'default: profile "prod" in ~/.aliyun/config.json, mode RamRoleArn', {"AssumeRole": 1}
    elif link == "cli-ChainableRamRoleArn":
        chain.cli_config([{"name": "base", "mode": "RamRoleArn", **chain.user(), "ram_role_arn": emu.relay_role_arn},
                          {**prod, "mode": "ChainableRamRoleArn", "source_profile": "base",
                           "ram_role_arn": emu.role_arn}])
        return ('default: profile "prod" in ~/.aliyun/config.json, mode ChainableRamRoleArn (source_profile "base")',
                {"AssumeRole": 2})
    elif link == "cli-EcsRamRole":
        srv = local()
        srv.doc = imds_doc(chain)
        chain.creds["ecs_metadata_url"] = srv.url + "/latest/meta-data/ram/security-credentials/"
        chain.cli_config([{**prod, "mode": "EcsRamRole", "ram_role_name": srv.role}])
    elif link == "cli-OIDC":
        chain.cli_config([{**prod, "mode": "OIDC", "ram_role_arn": emu.role_arn,
                           "oidc_provider_arn": emu.oidc.provider_arn, "oidc_token_file": chain.token_file()}])
        return 'default: profile "prod" in ~/.aliyun/config.json, mode OIDC', {"AssumeRoleWithOIDC": 1}
    elif link == "cli-External":
        chain.cli_config([{**prod, "mode": "External", "process_command": external_script(chain, chain.sts())}])
    if link.startswith("cli-"):
        return f'default: profile "prod" in ~/.aliyun/config.json, mode {link[4:]}', {}
    if link == "ini-access_key":
        chain.ini({"default": {"type": "access_key", **chain.root()}})
    elif link == "ini-ram_role_arn":
        chain.ini({"default": {"type": "ram_role_arn", **chain.user(), "role_arn": emu.role_arn}})
        return "default: profile [default] in ~/.alibabacloud/credentials.ini, type ram_role_arn", {"AssumeRole": 1}
    elif link == "ini-oidc_role_arn":
        chain.ini({"default": {"type": "oidc_role_arn", "role_arn": emu.role_arn,
                               "oidc_provider_arn": emu.oidc.provider_arn,
                               "oidc_token_file_path": chain.token_file()}})
        return ("default: profile [default] in ~/.alibabacloud/credentials.ini, type oidc_role_arn",
                {"AssumeRoleWithOIDC": 1})
    elif link == "ini-ecs_ram_role":
        srv = local()
        srv.doc = imds_doc(chain)
        chain.creds["ecs_metadata_url"] = srv.url + "/latest/meta-data/ram/security-credentials/"
        chain.ini({"default": {"type": "ecs_ram_role", "role_name": srv.role}})
    if link.startswith("ini-"):
        return f"default: profile [default] in ~/.alibabacloud/credentials.ini, type {link[4:]}", {}
    if link == "imds":
        srv = local()
        srv.doc = imds_doc(chain)
        chain.creds["ecs_metadata_url"] = srv.url + "/latest/meta-data/ram/security-credentials/"
        chain.env["ALIBABA_CLOUD_ECS_METADATA_DISABLED"] = ""
        chain.imds = srv
        return "default: ECS instance metadata", {}
    if link == "uri":
        srv = local()
        srv.doc = imds_doc(chain)
        chain.env["ALIBABA_CLOUD_CREDENTIALS_URI"] = srv.url + "/creds"
        return "default: credentials URI (ALIBABA_CLOUD_CREDENTIALS_URI)", {}
    raise AssertionError(link)


LINKS = ["env-alibaba", "env-oss", "oidc-env", "cli-AK", "cli-StsToken", "cli-RamRoleArn",
         "cli-ChainableRamRoleArn", "cli-EcsRamRole", "cli-OIDC", "cli-External", "ini-access_key",
         "ini-ram_role_arn", "ini-oidc_role_arn", "ini-ecs_ram_role", "imds", "uri"]


@pytest.mark.parametrize("link", LINKS)
def test_each_link_uploads_byte_equal(chain, local, link):
    """`ossyncd upload` (the daemon's stack) with only this link present: the file lands
    byte-equal, the log names the link, the STS calls are the link's, and no secret is printed."""
    expected, calls = _setup(link, chain, local)
    chain.emu.reset_stats()
    r = chain.upload(f"{link}.bin")
    assert chain.resolved(r).startswith(expected), chain.resolved(r)
    ok = chain.emu.stats()["ok"]
    for op, n in calls.items():
        assert ok.get(op, 0) == n, ok
    if not calls:
        assert not ok.get("AssumeRole") and not ok.get("AssumeRoleWithOIDC"), ok
    if link == "imds":   # IMDSv2: the session token came first
        first = chain.imds.requests[0]
        assert (first[0], first[1]) == ("PUT", "/latest/api/token")
    chain.assert_no_secrets()


# --------------------------------------------------------------------------- 2. precedence

def test_precedence_follows_the_official_order_and_check_config_names_the_link(chain, local):
    """With every link present, check-config names the first in the official order; taking
    that one away names the next (env -> OIDC -> config.json -> credentials.ini -> URI)."""
    emu = chain.emu
    _setup("env-alibaba", chain, local)
    _setup("oidc-env", chain, local)
    _setup("cli-AK", chain, local)
    _setup("ini-access_key", chain, local)
    _setup("uri", chain, local)
    steps = [
        ("default: environment ALIBABA_CLOUD_ACCESS_KEY_ID", ("ALIBABA_CLOUD_ACCESS_KEY_ID", "")),
        ("default: OIDC token file", ("ALIBABA_CLOUD_OIDC_TOKEN_FILE", "")),
        ('default: profile "prod" in ~/.aliyun/config.json, mode AK', ("ALIBABA_CLOUD_CLI_PROFILE_DISABLED", "true")),
        ("default: profile [default] in ~/.alibabacloud/credentials.ini, type access_key",
         ("ALIBABA_CLOUD_CREDENTIALS_FILE", str(chain.tmp / "no-such.ini"))),
    ]
    cfg = chain.config()
    for expected, (var, value) in steps:
        r = chain.run("check-config", "-c", cfg)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"credentials ({expected}" in r.stdout, r.stdout
        chain.env[var] = value
    # a named INI file that does not exist is an error, as the official provider makes it; the
    # URI answers after it
    r = chain.run("check-config", "-c", cfg)
    assert r.returncode == 0 and "credentials (default: credentials URI (ALIBABA_CLOUD_CREDENTIALS_URI)): ok" \
        in r.stdout, r.stdout + r.stderr
    assert emu.stats()["ok"].get("AssumeRoleWithOIDC") == 1   # the OIDC step, once
    chain.assert_no_secrets()


# --------------------------------------------------------------------------- 3. errors: one line, never for good

def _one_line(text: str, *needles: str) -> str:
    lines = [ln for ln in text.splitlines() if all(n in ln for n in needles)]
    assert lines, f"no line with {needles} in:\n{text}"
    return lines[0]


def test_errors_are_one_actionable_line_and_nothing_fails_for_good(chain, local, daemon_factory):
    """One daemon, the chain's sources broken in turn (a URI answering 500, then malformed JSON;
    a config.json with broken JSON, a missing profile, an External command exiting non-zero or
    hanging, an unreadable OIDC token file, an OIDC token STS rejects): each gives a one-line message naming the file or
    variable in check-config and in status, the queued file waits, and once the profile is fixed it
    uploads byte-equal with no failure recorded."""
    emu = chain.emu
    srv = local()
    chain.env["ALIBABA_CLOUD_CREDENTIALS_URI"] = srv.url + "/creds"
    chain.creds["timeout_seconds"] = 1.5
    watch = chain.tmp / "watch"
    watch.mkdir()
    d = daemon_factory([{"path": str(watch), "prefix": "w/", "settle_seconds": 0.2}], credentials=chain.creds,
                       upload=fast_upload(file_retry_delay=0.5, file_retry_delay_max=1.0))
    data = random_file(watch / "a.bin", 200 * 1024, seed=7)
    d.start(env=chain.env)
    helper = chain.tmp / "helper.py"
    helper_mode = chain.tmp / "helper.mode"

    def status_line():
        r = chain.run("status", "-c", d.config)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def expect(*needles, cc_needles=None):
        """check-config fails with a one-line message, and the daemon's status shows it."""
        r = chain.run("check-config", "-c", d.config)
        assert r.returncode != 0, r.stdout
        line = _one_line(r.stdout + r.stderr, *(cc_needles or needles))
        assert len(line) < 400, line
        wait_until(lambda: all(n in status_line() for n in needles), 20, interval=0.3,
                   what=f"status showing {needles} (log {d.log_path})")
        assert d.proc.poll() is None, d.output()[-3000:]
        return line

    srv.status, srv.body = 500, b"{}"
    expect("credentials URI", "HTTP 500", "ALIBABA_CLOUD_CREDENTIALS_URI")
    srv.status, srv.body = 200, b"<html>nope</html>"
    expect("credentials URI", "did not return JSON")

    cli = chain.home / ".aliyun"
    cli.mkdir()
    (cli / "config.json").write_text('{\n  "current": "prod",\n  "profiles": [\n    {"name": "prod",,}\n  ]\n}\n')
    expect("~/.aliyun/config.json is not valid JSON at line 4")
    chain.cli_config([{"name": "other", "mode": "AK", **chain.root()}])
    expect("profile 'prod' is not in ~/.aliyun/config.json (profiles: other)", "ALIBABA_CLOUD_PROFILE")

    helper.write_text("import json, sys, time, pathlib\n"
                      f"mode = pathlib.Path({str(helper_mode)!r}).read_text()\n"
                      "if mode == 'fail':\n"
                      "    sys.stderr.write('boom: secret LTAIsecretsecretsecret123\\n'); sys.exit(3)\n"
                      "time.sleep(30)\n")
    helper_mode.write_text("fail")
    chain.cli_config([{"name": "prod", "mode": "External", "process_command": f"{sys.executable} {helper}"}])
    line = expect("credentials command", "exited with status 3")
    assert "LTAIsecretsecretsecret123" not in line and "boom" in line
    helper_mode.write_text("hang")
    expect("credentials command", "did not finish within 1.5s")

    tokdir = chain.tmp / "token-is-a-dir"
    tokdir.mkdir()
    chain.cli_config([{"name": "prod", "mode": "OIDC", "ram_role_arn": emu.role_arn,
                       "oidc_provider_arn": emu.oidc.provider_arn, "oidc_token_file": str(tokdir)}])
    expect(f"OIDC token file {tokdir} is unreadable")
    foreign = chain.tmp / "foreign-token"
    foreign.write_text(TestIssuer(issuer=emu.oidc.issuer).token())    # signed by another cluster's key
    chain.oidc_tokens.append(foreign.read_text())
    chain.cli_config([{"name": "prod", "mode": "OIDC", "ram_role_arn": emu.role_arn,
                       "oidc_provider_arn": emu.oidc.provider_arn, "oidc_token_file": str(foreign)}])
    expect("AuthenticationFail.OIDCToken.Invalid", f"{foreign} does not hold a token signed by the OIDC provider")

    assert d.status()["counts"].get("failed", 0) == 0
    chain.cli_config([{"name": "prod", "mode": "AK", **chain.root()}])
    d.wait_states({"done": 1}, 30)
    assert object_bytes(emu, "w/a.bin") == data
    st = d.status()
    assert st["credentials"]["link"] == 'default: profile "prod" in ~/.aliyun/config.json, mode AK'
    assert st["credentials"]["error"] is None
    (row,) = d.files()
    assert row["state"] == "done" and not row["error"]
    assert "LTAIsecretsecretsecret123" not in d.output()
    d.stop()
    chain.assert_no_secrets(d.output(), json.dumps(st), json.dumps(d.files()))


# --------------------------------------------------------------------------- 4. RRSA: 3-second tokens, token file rotated

def test_rrsa_3s_tokens_over_a_long_multipart_upload_with_the_token_file_rewritten(chain, daemon_factory):
    """The daemon on ACK-style RRSA (the three ALIBABA_CLOUD_* variables only), 3-second STS
    tokens, a ~25 s multipart upload (each part held 1 s by the server). Mid-run the test writes a
    new JWT into the token file and lets the old one expire: the upload completes byte-equal, no
    request is refused for authorization, no AssumeRoleWithOIDC fails, and the calls after the
    old token's expiry used the new token."""
    emu = chain.emu
    token_file = chain.tmp / "rrsa-token"
    old = emu.oidc.token(ttl=12)
    chain.oidc_tokens.append(old)
    token_file.write_text(old)
    old_jti, old_exp = (jwt.decode(old, options={"verify_signature": False})[k] for k in ("jti", "exp"))
    chain.env.update(ALIBABA_CLOUD_ROLE_ARN=emu.role_arn, ALIBABA_CLOUD_OIDC_PROVIDER_ARN=emu.oidc.provider_arn,
                     ALIBABA_CLOUD_OIDC_TOKEN_FILE=str(token_file))
    chain.creds["duration_seconds"] = 3
    watch = chain.tmp / "rrsa"
    watch.mkdir()
    d = daemon_factory([{"path": str(watch), "prefix": "rrsa/", "settle_seconds": 0.2}], credentials=chain.creds,
                       upload=fast_upload(part_size="256KiB", parallel_parts=1, max_files_in_flight=1))
    emu.set_faults([{"op": "UploadPart", "delay_ms": 1000}])
    t0 = time.monotonic()
    d.start(env=chain.env)
    data = random_file(watch / "long.bin", 24 * 256 * 1024, seed=3)
    wait_until(lambda: emu.stats()["parts_received"] >= 4, 20, interval=0.2, what="four parts")
    new = emu.oidc.token(ttl=600)
    chain.oidc_tokens.append(new)
    (chain.tmp / "rrsa-token.new").write_text(new)
    (chain.tmp / "rrsa-token.new").replace(token_file)     # as the kubelet swaps it: atomically
    new_jti = jwt.decode(new, options={"verify_signature": False})["jti"]
    wait_until(lambda: time.time() > old_exp + 1, 20, what="the old token's expiry")
    after_expiry = emu.stats()["oidc_tokens"].get(new_jti, 0)
    d.wait_states({"done": 1}, 60)
    elapsed = time.monotonic() - t0
    stats = emu.stats()
    print(f"\n[rrsa] {elapsed:.1f}s, AssumeRoleWithOIDC by token {stats['oidc_tokens']}, "
          f"UploadPart {stats['requests'].get('UploadPart')}, auth errors {auth_errors(stats)}")
    assert object_bytes(emu, "rrsa/long.bin") == data
    assert auth_errors(stats) == {}, stats["errors"]
    assert "AssumeRoleWithOIDC" not in stats["errors"], stats["errors"]
    assert stats["oidc_tokens"].get(old_jti, 0) >= 2, stats["oidc_tokens"]
    assert stats["oidc_tokens"][new_jti] > after_expiry >= 1, stats["oidc_tokens"]
    assert stats["requests"]["UploadPart"] == 24, "a part was sent twice"
    assert not stats["ok"].get("AssumeRole"), "no signed AssumeRole on RRSA"
    assert events(d, "credentials.chain_resolved")[0]["link"].startswith("default: OIDC token file")
    d.stop()
    chain.assert_no_secrets(d.output(), json.dumps(d.files()))


# --------------------------------------------------------------------------- 5. explicit sources

@pytest.mark.parametrize("source", ["profile-json", "profile-ini", "oidc", "process", "uri", "process+role_arn"])
def test_explicit_sources_upload_byte_equal(chain, local, source):
    """source = "profile" / "oidc" / "process" / "uri": one link only, named in the config (and
    role_arn turning a process's long-term key into AssumeRole tokens)."""
    emu = chain.emu
    c = {"sts_endpoint": emu.sts_url, "duration_seconds": 900}
    calls = {}
    if source == "profile-json":
        path = chain.tmp / "cli.json"
        path.write_text(json.dumps({"current": "x", "profiles": [
            {"name": "x", "mode": "AK", **chain.user()},
            {"name": "up", "mode": "RamRoleArn", **chain.user(), "ram_role_arn": emu.role_arn}]}))
        c.update(source="profile", profile="up", file=str(path))
        calls = {"AssumeRole": 1}
    elif source == "profile-ini":
        path = chain.tmp / "creds.ini"
        path.write_text(f"[up]\ntype = access_key  # the root key\naccess_key_id = {emu.root.id}\n"
                        f"access_key_secret = {emu.root.secret}\n")
        c.update(source="profile", profile="up", file=str(path))
    elif source == "oidc":
        c.update(source="oidc", role_arn=emu.role_arn, oidc_provider_arn=emu.oidc.provider_arn,
                 oidc_token_file=chain.token_file())
        calls = {"AssumeRoleWithOIDC": 1}
    elif source == "process":
        c.update(source="process", command=external_script(chain, chain.sts()).split(" "))
    elif source == "process+role_arn":
        script = external_script(chain, {**chain.user(), "mode": "AK"})
        c.update(source="process", command=script.split(" "), role_arn=emu.role_arn)
        calls = {"AssumeRole": 1}
    else:
        srv = local()
        srv.doc = imds_doc(chain)
        c.update(source="uri", url=srv.url + "/creds")
    chain.creds = c
    emu.reset_stats()
    chain.upload(f"{source}.bin")
    ok = emu.stats()["ok"]
    assert {op: ok.get(op, 0) for op in ("AssumeRole", "AssumeRoleWithOIDC")} == \
        {"AssumeRole": calls.get("AssumeRole", 0), "AssumeRoleWithOIDC": calls.get("AssumeRoleWithOIDC", 0)}, ok
    chain.assert_no_secrets()


# --------------------------------------------------------------------------- 6. ossyncd policy --rrsa

def test_policy_rrsa_prints_the_trust_policy_and_names_bad_options():
    arn = "acs:ram::1234567890123456:oidc-provider/ack-rrsa-c0ffee"
    iss = "https://oidc-ack-cn-hangzhou.oss-cn-hangzhou.aliyuncs.com/c0ffee"
    r = ossyncd("policy", "--rrsa", "--oidc-provider-arn", arn, "--oidc-issuer", iss, "--namespace", "media",
                "--service-account", "uploader")
    assert r.returncode == 0, r.stderr
    (st,) = json.loads(r.stdout)["Statement"]
    assert st["Action"] == "sts:AssumeRole" and st["Principal"] == {"Federated": [arn]}
    assert st["Condition"]["StringEquals"] == {"oidc:aud": "sts.aliyuncs.com", "oidc:iss": iss,
                                               "oidc:sub": "system:serviceaccount:media:uploader"}
    r = ossyncd("policy", "--rrsa", "--oidc-provider-arn", "nope", "--oidc-issuer", iss)
    assert r.returncode != 0 and "--oidc-provider-arn 'nope'" in r.stderr + r.stdout, r.stderr
