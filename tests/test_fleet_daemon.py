"""The daemon's half of the fleet (issue 11): a host whose config is just broker_url +
broker_token, its registration's prefixes, refusals and outages of the broker, heartbeats.

Every daemon is a real subprocess against the emulator. Where the real broker can do it, the
host talks to one (`real_broker`: `ossyncd broker run`; stopping it is the outage). The end to end
fleet (disable-client/enable-client, heartbeats in `broker status`) is in test_broker.py. The
stand-in `broker_endpoint` (the wire contract of docs/broker.md, with a real AssumeRole on the
emulator's STS and an inline policy for the client's prefixes) stays only for what the real
broker cannot be made to do on demand: answer 429 with a chosen Retry-After, refuse with any
code, and keep every heartbeat body it received (the real one stores the latest per host)."""

from __future__ import annotations

import json
import secrets
import signal
import socket
import time
import tomllib
from datetime import datetime
from http.server import BaseHTTPRequestHandler

import pytest

import ossyncd
from ossyncd.config import OssConfig, parse_config
from ossyncd.credentials import BrokerSource, RotatingCredentials
from ossyncd.credentials.http import Registration
from ossyncd.errors import ConfigError, CredentialsError
from ossyncd.fleet import denied_reason, heartbeat_url, resolve_oss, uncovered_watches, watch_key_prefix
from ossyncd.policy import inline_policy_json
from tests.broker_helpers import Broker
from tests.helpers import LoopbackServer, MiB, bucket_keys, events, object_bytes, random_file, wait_until
from tests.helpers import ossyncd as run_ossyncd

HEARTBEAT_KEYS = {"version", "host", "states", "queue", "failures", "last_upload", "credential_expiry", "sent_at"}


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class BrokerStandIn:
    """GET /v1/credentials and POST /v1/heartbeat as docs/broker.md specifies them."""

    def __init__(self, emu):
        self.emu = emu
        self.clients: dict[str, dict] = {}       # token -> name, prefixes, duration, refusal
        self.heartbeats: list[tuple[str, dict]] = []
        self.heartbeat_refusals: list[str] = []
        self.port = 0
        self.server: LoopbackServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/credentials"

    def register(self, name: str, prefixes: list[str], *, duration: int = 900) -> str:
        token = f"fleetTOKEN-{name}-{secrets.token_hex(8)}"
        self.clients[token] = {"name": name, "prefixes": prefixes, "duration": duration, "refusal": None}
        return token

    def refuse(self, name: str, status: int, code: str, **extra) -> None:
        for c in self.clients.values():
            if c["name"] == name:
                c["refusal"] = (status, code, extra)

    def allow(self, name: str) -> None:
        for c in self.clients.values():
            if c["name"] == name:
                c["refusal"] = None

    def beats(self, name: str) -> list[dict]:
        return [b for n, b in list(self.heartbeats) if n == name]

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def start(self) -> None:
        self.server = LoopbackServer(_handler(self), port=self.port)
        self.port = self.server.port

    def assume(self, client: dict) -> dict:
        from aliyunsdkcore.client import AcsClient
        from aliyunsdksts.request.v20150401.AssumeRoleRequest import AssumeRoleRequest

        acs = AcsClient(self.emu.user.id, self.emu.user.secret, self.emu.region, timeout=10, connect_timeout=5)
        req = AssumeRoleRequest()
        req.set_endpoint(self.emu.sts_url)
        req.set_RoleArn(self.emu.role_arn)
        req.set_RoleSessionName(client["name"])
        req.set_DurationSeconds(client["duration"])
        req.set_Policy(inline_policy_json("drop", client["prefixes"]))
        return json.loads(acs.do_action_with_exception(req))["Credentials"]


def _handler(broker: BrokerStandIn):
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, doc: dict | None = None, headers: dict | None = None):
            body = json.dumps(doc).encode() if doc is not None else b""
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if doc is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _route(self) -> tuple[str, str]:
            """(/v1/credentials or /v1/heartbeat, the token from the header or the path segment)."""
            auth = self.headers.get("Authorization", "")
            base, _, tail = self.path.partition("/v1/")
            what, _, path_token = tail.partition("/")
            return f"{base}/v1/{what}", path_token or (auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else "")

        def _client(self) -> dict | None:
            client = broker.clients.get(self._route()[1])
            if client is None:
                self._answer(401, {"Code": "Unauthorized", "Message": "unknown or missing token"})
                return None
            if client["refusal"] is not None:
                status, code, extra = client["refusal"]
                if self.command == "POST":
                    broker.heartbeat_refusals.append(client["name"])
                self._answer(status, {"Code": code, "Message": f"client {client['name']} refused", **extra},
                             headers={"Retry-After": "7"} if status == 429 else None)
                return None
            return client

        def do_GET(self):
            if self._route()[0] != "/v1/credentials":
                return self._answer(404, {"Code": "NotFound", "Message": self.path})
            client = self._client()
            if client is None:
                return
            try:
                creds = broker.assume(client)
            except Exception as e:   # the emulator's STS refused: the contract's 502
                return self._answer(502, {"Code": getattr(e, "error_code", "StsError"), "Message": str(e)[:200]})
            self._answer(200, {"Code": "Success", **creds, "Bucket": "drop", "Region": broker.emu.region,
                               "Endpoint": broker.emu.oss_url, "Prefixes": client["prefixes"]})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self._route()[0] != "/v1/heartbeat":
                return self._answer(404, {"Code": "NotFound", "Message": self.path})
            client = self._client()
            if client is None:
                return
            try:
                doc = json.loads(body)
                assert isinstance(doc, dict) and HEARTBEAT_KEYS <= set(doc) and isinstance(doc["states"], dict)
            except (ValueError, AssertionError):
                return self._answer(400, {"Code": "MalformedHeartbeat", "Message": "see docs/broker.md"})
            broker.heartbeats.append((client["name"], doc))
            self._answer(204)

        def log_message(self, *a):
            pass

    return Handler


@pytest.fixture
def broker_endpoint(emulator):
    """The broker the hosts talk to: register(name, prefixes, duration=) -> token, url,
    refuse/allow(name), stop/start, beats(name)."""
    b = BrokerStandIn(emulator)
    yield b
    b.stop()


@pytest.fixture
def real_broker(emulator, tmp_path):
    """`ossyncd broker run` (tests.broker_helpers.Broker) against this test's emulator."""
    b = Broker(tmp_path, emulator, name="fleet-broker").start()
    yield b
    b.stop()
    b.kill()


def broker_host(daemon_factory, broker, tmp_path, *, prefixes=("host1/",), watches=("host1/",), duration=900,
                name="host1", token_in_path=False, **credentials):
    """A host registered at the broker (the stand-in, or a real one) whose config has no [oss]
    endpoint, bucket or region; its token sent as a bearer header, or (token_in_path) as the URL's
    last segment."""
    if isinstance(broker, Broker):
        token, url = broker.add_client(name, *prefixes, max_duration=duration), f"{broker.url}/v1/credentials"
    else:
        token, url = broker.register(name, list(prefixes), duration=duration), broker.url
    auth = {"broker_url": f"{url}/{token}"} if token_in_path else {"broker_url": url, "broker_token": token}
    roots = []
    for i, prefix in enumerate(watches):
        roots.append(tmp_path / f"{name}-drop{i}")
        roots[-1].mkdir()
    d = daemon_factory([{"path": str(r), "prefix": p, "settle_seconds": 0.3} for r, p in zip(roots, watches)],
                       credentials={"source": "broker", **auth, "retry_backoff": 0.2, "retry_backoff_max": 1.0, **credentials},
                       oss={"endpoint": None, "bucket": None, "region": None})
    return d, token, roots


def started(d):
    """Start the daemon and wait for its first log line after the state DB is ready."""
    d.start()
    wait_until(lambda: events(d, "started"), 30, interval=0.1, what=f"the daemon to start (log: {d.log_path})")
    return d


def file_row(d, name: str) -> dict | None:
    return next((f for f in d.files() if f["path"].endswith("/" + name)), None)


# --------------------------------------------------------------------------- in-process, fast


def test_broker_refusals_carry_the_reason_and_what_to_do(broker_endpoint):
    b = broker_endpoint
    token = b.register("host9", ["host9/"])
    src = BrokerSource(url=b.url, token="fleetTOKEN-not-registered-00")
    with pytest.raises(CredentialsError) as e:
        src.fetch()
    msg = str(e.value)
    assert not e.value.transient and e.value.code == "Unauthorized"
    assert "HTTP 401 Unauthorized (Unauthorized: unknown or missing token)" in msg
    for fix in ("ossyncd broker list-clients", "rotate-token", "credentials.broker_token", "SIGHUP"):
        assert fix in msg
    assert "fleetTOKEN-not-registered-00" not in msg

    src = BrokerSource(url=b.url, token=token)
    b.refuse("host9", 403, "ClientDisabled")
    with pytest.raises(CredentialsError) as e:
        src.fetch()
    assert e.value.code == "ClientDisabled" and "disabled at the broker" in str(e.value)

    b.refuse("host9", 429, "Throttling")
    with pytest.raises(CredentialsError) as e:
        src.fetch()
    assert e.value.transient and e.value.retry_after == 7.0 and "after 7 s (Retry-After)" in str(e.value)
    rc = RotatingCredentials(src, min_backoff=0.1, max_backoff=1.0)
    before = time.time()
    rc.tick(before)
    assert rc.retry_at() >= before + 7.0            # Retry-After wins over the 0.1 s backoff

    b.refuse("host9", 502, "NoPermission", Permanent=True)
    with pytest.raises(CredentialsError) as e:
        src.fetch()
    assert not e.value.transient and e.value.code == "NoPermission" and "fails permanently" in str(e.value)
    b.refuse("host9", 503, "ServiceUnavailable")
    with pytest.raises(CredentialsError) as e:
        src.fetch()
    assert e.value.transient and e.value.code == "ServiceUnavailable"

    by_path = BrokerSource(url=f"{b.url}/{token}")   # for clients that cannot send headers
    with pytest.raises(CredentialsError) as e:
        by_path.fetch()
    assert e.value.code == "ServiceUnavailable" and token not in str(e.value) and "<redacted>" in str(e.value)

    b.allow("host9")
    assert by_path.fetch().security_token
    assert src.fetch().security_token
    reg = src.registration
    assert (reg.bucket, reg.region, reg.endpoint, reg.prefixes) == ("drop", b.emu.region, b.emu.oss_url, ("host9/",))


def test_heartbeat_url_is_derived_from_the_broker_url():
    assert heartbeat_url("https://b.example/v1/credentials") == "https://b.example/v1/heartbeat"
    assert heartbeat_url("https://b.example/fleet/v1/credentials/TOK") == "https://b.example/fleet/v1/heartbeat/TOK"
    assert heartbeat_url("https://b.example/api/cred") == ""
    assert heartbeat_url("https://b.example/api/cred", "https://hb.example/x") == "https://hb.example/x"


def test_only_the_broker_source_may_leave_oss_out(tmp_path):
    state = {"path": str(tmp_path / "s.db")}
    cfg = parse_config({"credentials": {"source": "broker", "broker_url": "https://b.example/v1/credentials"},
                        "state": state})
    assert (cfg.oss.endpoint, cfg.oss.bucket, cfg.oss.region) == ("", "", "")
    with pytest.raises(ConfigError, match=r"oss\.endpoint: required; add it \(only source = \"broker\""):
        parse_config({"oss": {"bucket": "drop", "region": "r"}, "credentials": {"source": "env"}, "state": state})
    with pytest.raises(ConfigError, match=r"oss\.bucket: required"):
        parse_config({"oss": {"endpoint": "http://127.0.0.1:1", "region": "r"}, "state": state})


def test_resolve_oss_fills_in_and_refuses_a_different_value():
    def left_out(**values):
        return OssConfig.model_validate(values, context={"oss_from_broker": True})
    reg = Registration("drop", "cn-x", "http://127.0.0.1:9/", ("a/",))
    oss = resolve_oss(left_out(region="cn-x"), reg, "B")
    assert (oss.bucket, oss.region, oss.endpoint) == ("drop", "cn-x", "http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="oss.region: 'cn-y' differs from 'cn-x', which the credentials broker B"):
        resolve_oss(oss.model_copy(update={"region": "cn-y"}), reg, "B")
    with pytest.raises(ConfigError, match="did not send Bucket"):
        resolve_oss(left_out(), Registration(), "B")


def test_watch_key_prefix_and_the_denied_reason(tmp_path):
    cfg = parse_config({"credentials": {"source": "broker", "broker_url": "https://b.example/v1/credentials"},
                        "state": {"path": str(tmp_path / "s.db")}, "upload": {},
                        "watch": [{"path": str(tmp_path), "prefix": "cam", "key_template": "{prefix}{yyyy}/{relpath}"}]})
    [w] = cfg.watch
    assert watch_key_prefix(w) == "cam/"
    assert uncovered_watches(cfg.watch, ("cam/",)) == [] and uncovered_watches(cfg.watch, ("cam/2026/",)) == [(w, "cam/")]
    assert denied_reason("cam/2026/x", ("cam/",)) is None and denied_reason("cam/x", None) is None
    assert denied_reason("other/x", ("a/", "b/")).startswith(
        "key other/x is outside the prefixes this host is registered for at the broker (a/, b/)")


# --------------------------------------------------------------------------- the daemon
# Waits read the daemon's log (cheap); each claim is then checked once with `ossyncd status`/`list`.


def logged(d, event: str, path: str | None = None, text: str | None = None) -> list[dict]:
    """The daemon's log lines `event`, about a file whose path ends in `path`, holding `text`."""
    return [e for e in events(d, event) if (path is None or str(e.get("path", "")).endswith("/" + path))
            and (text is None or text in json.dumps(e))]


def uploaded(d, *names: str) -> bool:
    return all(logged(d, "uploaded", n) for n in names)


def test_host_with_only_broker_url_and_token_uploads_byte_equal(daemon_factory, broker_endpoint, tmp_path, emulator):
    b = broker_endpoint
    d, token, (drop,) = broker_host(daemon_factory, b, tmp_path, duration=2,   # refreshes every ~1.6 s
                                    token_in_path=True)
    oss = tomllib.loads(d.config.read_text())["oss"]
    assert not {"endpoint", "bucket", "region"} & set(oss)
    started(d)
    small = random_file(drop / "a.bin", 1000, 1)
    big = random_file(drop / "sub" / "b.bin", int(1.5 * MiB), 2)   # multipart
    wait_until(lambda: uploaded(d, "a.bin", "b.bin"), 30, interval=0.1, what="both uploads")
    assert object_bytes(emulator, "host1/a.bin") == small
    assert object_bytes(emulator, "host1/sub/b.bin") == big
    st = d.status()
    assert st["counts"]["done"] == 2
    assert st["broker"]["registration"] == {"bucket": "drop", "region": emulator.region,
                                            "endpoint": emulator.oss_url, "prefixes": ["host1/"]}
    # a heartbeat after each refresh, though the interval (60 s) is far off; its URL keeps the token's form
    wait_until(lambda: len(b.beats("host1")) >= 2, 15, what="a heartbeat per credentials refresh")
    assert st["broker"]["heartbeat"]["url"] == f"http://127.0.0.1:{b.port}/v1/heartbeat/<token>"
    shown = run_ossyncd("status", "-c", d.config).stdout
    assert "broker registration: bucket drop, prefixes host1/" in shown and "<token>" in shown
    # a reload keeps the broker's [oss] values: nothing to "restart to apply"
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: events(d, "config reloaded"), 15, interval=0.1, what="the reload")
    assert not events(d, "setting changed; restart to apply")
    assert not events(d, "credentials broker names another oss value; restart to apply")
    assert not events(d, "reload rejected; the running config stays in force")
    assert token not in d.output()


def test_startup_errors_name_the_broker(daemon_factory, real_broker, tmp_path):
    """A configured bucket other than the broker's is a config error (exit 2, naming both); with
    [oss] left out and the broker down, the start fails (exit 1: systemd starts it again)."""
    d, _, _ = broker_host(daemon_factory, real_broker, tmp_path)
    plain = d.config.read_text()
    d.config.write_text(plain.replace("[oss]\n", '[oss]\nbucket = "other"\n'))
    r = run_ossyncd("run", "-c", d.config, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "oss.bucket: 'other' differs from 'drop', which the credentials broker" in r.stderr
    assert "remove oss.bucket" in r.stderr
    d.config.write_text(plain)
    real_broker.stop()
    r = run_ossyncd("run", "-c", d.config, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "unreachable: connection refused" in r.stderr and "the broker must answer once at start" in r.stderr


def _outage(daemon_factory, broker, tmp_path, emulator, down_for: float):
    """Stop the broker while a host uploads, for longer than a token lives (and `down_for` more):
    uploads wait, nothing fails, and they finish within one retry interval of its return."""
    retry_max = 1.0
    d, _, (drop,) = broker_host(daemon_factory, broker, tmp_path, duration=2, retry_backoff_max=retry_max)
    started(d)
    random_file(drop / "a.bin", 500, 7)
    wait_until(lambda: uploaded(d, "a.bin"), 30, interval=0.1, what="a.bin uploaded")
    broker.stop()
    wait_until(lambda: logged(d, "credentials.refresh_failed", text="unreachable"), 20, interval=0.1,
               what="a refresh meeting the stopped broker")
    expiry = _epoch(events(d, "credentials.refreshed")[-1]["expires_at"])
    wait_until(lambda: time.time() > expiry, 10, what="the last token to expire")
    data = random_file(drop / "b.bin", 800, 8)

    def long_enough():
        assert not logged(d, "upload failed"), d.output()[-2000:]
        return logged(d, "credentials unavailable", "b.bin") and time.time() > expiry + down_for
    wait_until(long_enough, 30 + down_for, interval=0.2, what="an outage longer than a token lives")
    row = file_row(d, "b.bin")
    assert row["state"] == "retry_wait" and "unreachable" in row["error"]
    assert d.status()["counts"]["failed"] == 0
    broker.start()
    back = time.monotonic()
    wait_until(lambda: uploaded(d, "b.bin"), 20, interval=0.05, what="b.bin uploaded after the broker's return")
    recovery = time.monotonic() - back
    print(f"recovered {recovery:.2f} s after the broker came back (retry interval {retry_max} s)")
    assert recovery < retry_max + 3.0   # one retry interval, plus a dispatch and an upload on busy cores
    assert object_bytes(emulator, "host1/b.bin") == data
    st = d.status()
    assert st["counts"]["done"] == 2 and st["counts"]["failed"] == 0


def test_broker_down_longer_than_a_token_lives(daemon_factory, real_broker, tmp_path, emulator):
    _outage(daemon_factory, real_broker, tmp_path, emulator, down_for=1.0)


@pytest.mark.soak
def test_broker_down_for_a_minute(daemon_factory, real_broker, tmp_path, emulator):
    _outage(daemon_factory, real_broker, tmp_path, emulator, down_for=60.0)


def test_prefix_outside_the_registration_fails_naming_it_and_heartbeats_match_status(
        daemon_factory, broker_endpoint, tmp_path, emulator):
    """One host, two watches: one inside its registration, one outside (cover items b and e)."""
    b = broker_endpoint
    d, token, (inside, outside) = broker_host(daemon_factory, b, tmp_path, watches=("host1/", "elsewhere/"),
                                              broker_heartbeat_interval=1)
    started(d)
    data = [random_file(inside / f"f{i}.bin", 300 + i, 10 + i) for i in range(3)]
    random_file(outside / "x.bin", 100, 20)
    wait_until(lambda: uploaded(d, "f0.bin", "f1.bin", "f2.bin") and logged(d, "upload failed", "x.bin"), 30,
               interval=0.1, what="three uploads and one refusal")
    failed = file_row(d, "x.bin")
    assert failed["state"] == "failed" and "AccessDenied" in failed["error"]
    assert ("key elsewhere/x.bin is outside the prefixes this host is registered for at the broker (host1/); "
            "register it with `ossyncd broker add-client ... --prefix` or change watch.prefix") in failed["error"]
    assert [object_bytes(emulator, f"host1/f{i}.bin") for i in range(3)] == data
    assert bucket_keys(emulator) == [f"host1/f{i}.bin" for i in range(3)]
    [warning] = events(d, "watch prefix outside the broker registration")
    assert warning["watch"] == f"watch[1] {outside}" and warning["key_prefix"] == "elsewhere/"
    assert warning["broker_prefixes"] == ["host1/"]

    seen = {}

    def matches():
        st = d.status()
        beats = b.beats("host1")
        if not beats:
            return False
        seen["status"], seen["beat"] = st, beats[-1]
        return {k: v for k, v in beats[-1]["states"].items() if v} == {k: v for k, v in st["counts"].items() if v}
    wait_until(matches, 15, interval=0.3, what="a heartbeat with the counts of `ossyncd status --json`")
    st, beat = seen["status"], seen["beat"]
    assert beat["states"]["done"] == 3 and beat["failures"] == 1 and beat["queue"] == 0
    assert beat["credential_expiry"] == st["credentials"]["expires_at"]
    assert beat["version"] == ossyncd.__version__ and beat["host"] == socket.gethostname()
    assert _epoch(beat["last_upload"]) <= _epoch(beat["sent_at"]) <= time.time() + 1
    assert st["broker"]["heartbeat"]["error"] is None and st["broker"]["heartbeat"]["last_sent_at"]
    assert token not in d.output()
