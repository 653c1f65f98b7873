"""`ossyncd broker`: a real broker subprocess against the emulator's STS, real daemons (source =
"broker") against its OSS, the official alibabacloud-credentials client (docs/broker.md).

One emulator and one broker serve the module (each test registers its own clients), so the
default suite pays for their start-up once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import oss2
import pytest
import requests

from tests.broker_helpers import Broker
from tests.helpers import events, fast_upload, ossyncd, random_file, root_bucket, wait_until

SECRETS: set[str] = set()   # every client token, AccessKeySecret and SecurityToken the tests saw


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    from tests.ossemu import Emulator

    e = Emulator(str(tmp_path_factory.mktemp("broker-emu")), buckets=["drop"], min_duration=1)
    e.start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def broker_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("broker")


@pytest.fixture(scope="module")
def broker(emu, broker_dir):
    b = Broker(broker_dir, emu).start()
    yield b
    b.stop()
    b.kill()


def stats(emu) -> dict:
    return requests.get(f"{emu.oss_url}/-/stats", timeout=10).json()


def sessions(emu, name: str) -> int:
    return stats(emu).get("assume_role_sessions", {}).get(name, 0)


def fetch(broker, token):
    status, headers, doc = broker.request("/v1/credentials", token=token)
    for k in ("AccessKeySecret", "SecurityToken"):
        if doc.get(k):
            SECRETS.add(doc[k])
    return status, headers, doc


def add(broker, name, *prefixes, **opts) -> str:
    token = broker.add_client(name, *prefixes, **opts)
    assert len(token) >= 40 and "\n" not in token
    SECRETS.add(token)
    return token


def daemon_for(daemon_factory, broker, emu, tmp_path, name, token, prefix):
    watch = tmp_path / name
    watch.mkdir()
    d = daemon_factory([{"path": str(watch), "prefix": prefix, "settle_seconds": 0.3}], emu=emu, name=name,
                       credentials=broker.daemon_credentials(token), upload=fast_upload())
    return d, watch


# ---------------------------------------------------------------- (a) three hosts, own prefixes
def _nonzero(counts: dict) -> dict:
    return {k: v for k, v in counts.items() if v}


def test_three_broker_only_hosts_upload_beat_and_show_in_fleet_status_then_disable_enable(
        broker, emu, daemon_factory, tmp_path):
    """The fleet end to end: three hosts whose config is only broker_url + broker_token (no [oss]
    bucket, endpoint or region), each under its own prefix; their heartbeats make `ossyncd broker
    status --json` agree with each host's `ossyncd status --json`; a disabled client's files wait
    (not failed) and finish once it is enabled again."""
    daemons = []
    for i in (1, 2, 3):
        # host3 gets 2 s tokens, so its disable bites at once (the broker's revocation is for new tokens)
        token = add(broker, f"host{i}", f"site{i}/", **({"max_duration": 2} if i == 3 else {}))
        watch = tmp_path / f"host{i}"
        watch.mkdir()
        d = daemon_factory([{"path": str(watch), "prefix": f"site{i}/", "settle_seconds": 0.3}], emu=emu,
                           name=f"host{i}", upload=fast_upload(), oss={"endpoint": None, "bucket": None, "region": None},
                           credentials={**broker.daemon_credentials(token), "broker_heartbeat_interval": 0.5})
        daemons.append((d, watch))
    assert "bucket" not in daemons[0][0].config.read_text()
    sent = {}
    for i, (d, watch) in enumerate(daemons, 1):
        sent[f"site{i}/a.bin"] = random_file(watch / "a.bin", 2 * 1024 * 1024 + i, seed=i)   # multipart
        sent[f"site{i}/b.txt"] = random_file(watch / "b.txt", 1000 + i, seed=10 + i)
    for d, _ in daemons:
        d.start()
    for d, _ in daemons:
        d.wait_states({"done": 2}, timeout=60)
    bucket = root_bucket(emu)
    for key, data in sent.items():
        assert bucket.get_object(key).read() == data, key
    for i in (1, 2, 3):   # each host's session is named after its registration
        assert sessions(emu, f"host{i}") >= 1
    for d, _ in daemons:
        assert "AccessDenied" not in d.output()   # the orphan sweep's narrowed listing is allowed too

    def fleet() -> dict:
        d = json.loads(broker.cli("status", "--json").stdout)
        return {c["name"]: c for c in d["clients"] if c["name"] in ("host1", "host2", "host3")}

    def agree() -> bool:   # the broker's view first (in-process, cheap), then each host's own status
        clients = fleet()
        beats = [clients[f"host{i}"]["hosts"] for i in (1, 2, 3)]
        if any(len(h) != 1 or h[0]["states"].get("done") != 2 for h in beats):
            return False
        return all(_nonzero(h[0]["states"]) == _nonzero(d.status()["counts"]) for h, (d, _) in zip(beats, daemons))
    wait_until(agree, 30, interval=0.2, what="broker status agreeing with each host's own status")
    clients = fleet()
    for i, (d, _) in enumerate(daemons, 1):
        [h] = clients[f"host{i}"]["hosts"]
        assert h["failures"] == 0 and h["queue"] == 0 and not h["silent"] and h["credential_expiry"]

    # check-config and policy complete [oss] from the broker too
    d1 = daemons[0][0]
    r = ossyncd("check-config", "-c", d1.config)
    assert r.returncode == 0, r.stderr
    assert "bucket drop)" in r.stdout and f"endpoint {emu.oss_url}: ok (bucket drop reachable" in r.stdout, r.stdout
    assert "uploads allowed under prefix(es) 'site1/'" in r.stdout
    r = ossyncd("policy", "-c", d1.config)
    assert r.returncode == 0, r.stderr
    resources = [x for st in json.loads(r.stdout)["Statement"] for x in st["Resource"]]
    assert "acs:oss:*:*:drop/site1/*" in resources and not [x for x in resources if ":/" in x or x.endswith(":")]

    # disable host3: its next refresh is refused, its token runs out, its new file waits
    d3, watch3 = daemons[2]
    broker.cli("disable-client", "host3")
    wait_until(lambda: [e for e in events(d3, "credentials.refresh_failed") if "disabled at the broker" in e["error"]],
               30, interval=0.1, what="host3's refresh refused")
    from ossyncd.credentials.base import parse_expiration
    expiry = parse_expiration(events(d3, "credentials.refreshed")[-1]["expires_at"])
    wait_until(lambda: time.time() > expiry, 10, what="host3's last token to expire")
    sent["site3/c.txt"] = random_file(watch3 / "c.txt", 700, seed=33)
    wait_until(lambda: [e for e in events(d3, "credentials unavailable") if str(e.get("path")).endswith("c.txt")],
               30, interval=0.1, what="c.txt waiting for credentials")
    [row] = [f for f in d3.files() if f["path"].endswith("c.txt")]
    assert row["state"] == "retry_wait" and "ClientDisabled" in row["error"], row
    st = d3.status()
    assert st["counts"].get("failed", 0) == 0 and "disabled at the broker" in st["credentials"]["error"]
    wait_until(lambda: "HTTP 403 (ClientDisabled" in (d3.status()["broker"]["heartbeat"]["error"] or ""), 10,
               interval=0.3, what="host3's heartbeat refused too")
    shown = ossyncd("status", "-c", d3.config).stdout
    assert "disabled at the broker" in shown, shown
    assert st["credentials"]["next_attempt_at"]
    assert len(events(d3, "heartbeat.failed")) == 1   # refused every 0.5 s meanwhile, logged once
    broker.cli("enable-client", "host3")
    d3.wait_states({"done": 3}, timeout=30)
    assert bucket.get_object("site3/c.txt").read() == sent["site3/c.txt"]
    assert not d3.files("failed")
    wait_until(lambda: events(d3, "heartbeat.recovered"), 10, interval=0.1, what="host3's heartbeat recovery")
    st = d3.status()
    assert st["credentials"]["error"] is None and st["broker"]["heartbeat"]["error"] is None
    assert not events(d3, "upload failed")


def test_inline_policy_narrows_listing_and_writes_to_the_registration(broker, emu):
    token = add(broker, "narrow", "zone1/", "zone2/")
    status, _, doc = fetch(broker, token)
    assert status == 200 and doc["Prefixes"] == ["zone1/", "zone2/"] and doc["Bucket"] == "drop"
    assert doc["Endpoint"] == emu.oss_url and doc["Region"] == emu.region
    assert doc["Expiration"].endswith("Z")
    bucket = oss2.Bucket(oss2.StsAuth(doc["AccessKeyId"], doc["AccessKeySecret"], doc["SecurityToken"]),
                         emu.oss_url, "drop")
    bucket.put_object("zone2/ok.txt", b"ok")
    bucket.list_multipart_uploads(prefix="zone1/")
    bucket.list_multipart_uploads(prefix="zone2/x/")
    for prefix in ("", "zone3/", "zone"):
        with pytest.raises(oss2.exceptions.AccessDenied):
            bucket.list_multipart_uploads(prefix=prefix)
    with pytest.raises(oss2.exceptions.AccessDenied):
        bucket.put_object("zone3/no.txt", b"no")
    assert root_bucket(emu).get_object("zone2/ok.txt").read() == b"ok"


# ---------------------------------------------------------------- (b) a prefix outside the registration
def test_watch_prefix_outside_the_registration_is_denied_and_failed(broker, emu, daemon_factory, tmp_path):
    token = add(broker, "stray", "stray-own/")
    d, watch = daemon_for(daemon_factory, broker, emu, tmp_path, "stray", token, "someone-else/")
    random_file(watch / "x.txt", 500, seed=5)
    d.start()
    d.wait_states({"failed": 1}, timeout=60)
    [row] = d.files("failed")
    assert "AccessDenied" in row["error"], row
    with pytest.raises(oss2.exceptions.NoSuchKey):
        root_bucket(emu).get_object("someone-else/x.txt")


# ---------------------------------------------------------------- (c) revocation
def test_disable_enable_rotate_remove(broker):
    token = add(broker, "revoked", "rev/")
    assert fetch(broker, token)[0] == 200
    broker.cli("disable-client", "revoked")
    status, _, doc = fetch(broker, token)
    assert (status, doc["Code"]) == (403, "ClientDisabled") and "revoked" in doc["Message"]
    assert "AccessKeyId" not in doc
    [listed] = [c for c in json.loads(broker.cli("list-clients", "--json").stdout) if c["name"] == "revoked"]
    assert listed["disabled"] is True and listed["prefixes"] == ["rev/"]
    broker.cli("enable-client", "revoked")
    assert fetch(broker, token)[0] == 200
    new = broker.cli("rotate-token", "revoked").stdout.strip()
    SECRETS.add(new)
    assert fetch(broker, token)[0] == 401
    assert fetch(broker, new)[0] == 200
    broker.cli("remove-client", "revoked")
    status, _, doc = fetch(broker, new)
    assert (status, doc["Code"]) == (401, "Unauthorized")
    r = broker.cli("remove-client", "revoked", check=False)
    assert r.returncode == 1 and "not registered" in r.stderr
    listed = json.loads(broker.cli("list-clients", "--json").stdout)
    assert "revoked" not in [c["name"] for c in listed]
    assert not any(new in json.dumps(c) or token in json.dumps(c) for c in listed)


def test_add_client_refuses_bad_input(broker):
    r = broker.cli("add-client", "x y", "--prefix", "a/", check=False, inprocess=False)
    assert r.returncode == 2 and r.stderr.startswith("client: ") and "RoleSessionName" in r.stderr
    r = broker.cli("add-client", "badprefix", "--prefix", "site1", check=False)
    assert r.returncode == 2 and "--prefix" in r.stderr and "ending in '/'" in r.stderr
    r = broker.cli("add-client", "badrole", "--prefix", "a/", "--role", "uploader", check=False)
    assert r.returncode == 2 and "--role" in r.stderr


def test_sts_errors_map_to_502_permanent_and_503_transient(broker, emu):
    token = add(broker, "norole", "nr/", role="acs:ram::1234567890123456:role/missing")
    status, _, doc = fetch(broker, token)
    assert (status, doc["Code"], doc["Permanent"]) == (502, "EntityNotExist.Role", True), doc
    token = add(broker, "flaky", "fl/")
    rule = [{"op": "AssumeRole", "status": 503, "code": "ServiceUnavailable", "count": 1}]
    requests.post(f"{emu.oss_url}/-/faults", json=rule, timeout=10).raise_for_status()
    try:
        status, headers, doc = fetch(broker, token)
    finally:
        requests.delete(f"{emu.oss_url}/-/faults", timeout=10)
    assert (status, doc["Code"], doc["Permanent"]) == (503, "ServiceUnavailable", False), doc
    assert int(headers["Retry-After"]) >= 1
    assert fetch(broker, token)[0] == 200   # not cached as a failure


def test_broker_whose_own_identity_cannot_work_refuses_to_start_naming_it(emu, tmp_path):
    """source = "env" with the variables unset can only ever answer 502: `broker run` exits 1
    before it listens, naming the variables; a transient failure (a credentials URI not up yet)
    serves and answers 503 with Retry-After while the identity is retried."""
    from tests.broker_helpers import free_port

    unset = {k: "" for k in ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN",
                             "ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
                             "ALIBABA_CLOUD_SECURITY_TOKEN")}
    sts = {"sts_endpoint": emu.sts_url, "sts_region": emu.region, "timeout_seconds": 2.0}
    (tmp_path / "env").mkdir()
    env_only = Broker(tmp_path / "env", emu, credentials={"source": "env", **sts})
    r = ossyncd("broker", "run", "-c", env_only.config, env=unset, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "the broker's own identity ([credentials])" in r.stderr and "OSS_ACCESS_KEY_ID" in r.stderr, r.stderr
    assert "broker.listening" not in r.stdout and "broker.cannot_start" in r.stdout, r.stdout

    (tmp_path / "uri").mkdir()
    later = Broker(tmp_path / "uri", emu, credentials={"source": "uri", "url": f"http://127.0.0.1:{free_port()}/creds",
                                                       "retry_backoff": 5.0, **sts}).start(env=unset)
    try:
        assert events_named(later, "broker.identity_unavailable"), later.output()[-2000:]
        token = later.add_client("waits", "w/")
        status, headers, doc = later.request("/v1/credentials", token=token)
        assert (status, doc["Permanent"]) == (503, False) and int(headers["Retry-After"]) >= 1, (status, doc)
    finally:
        later.stop()


def events_named(b: Broker, name: str) -> list[dict]:
    return [e for e in b.log_lines() if e.get("event") == name]


# ---------------------------------------------------------------- (d) broker restart during uploads
def test_broker_restart_while_uploading_daemons_keep_going_and_recover(broker, emu, daemon_factory, tmp_path):
    token = add(broker, "steady", "steady/")
    d, watch = daemon_for(daemon_factory, broker, emu, tmp_path, "steady", token, "steady/")
    sent = {f"steady/f{i}.bin": random_file(watch / f"f{i}.bin", 3000 + i, seed=100 + i) for i in range(3)}
    d.start()
    d.wait_states({"done": 3}, timeout=60)
    broker.stop()
    try:
        # broker down: the daemon uploads on the token it holds
        sent.update({f"steady/g{i}.bin": random_file(watch / f"g{i}.bin", 4000 + i, seed=200 + i) for i in range(3)})
        d.wait_states({"done": 6}, timeout=60)
    finally:
        broker.start()
    # every token OSS knows is now expired: the daemon must come back to the restarted broker
    before = sessions(emu, "steady")
    requests.post(f"{emu.oss_url}/-/expire-tokens", timeout=10).raise_for_status()
    sent["steady/h.bin"] = random_file(watch / "h.bin", 5000, seed=300)
    d.wait_states({"done": 7}, timeout=60)
    assert sessions(emu, "steady") > before
    bucket = root_bucket(emu)
    for key, data in sent.items():
        assert bucket.get_object(key).read() == data, key
    assert not d.files("failed")


# ---------------------------------------------------------------- (e) the official SDK's credentials URI
_SDK_CLIENT = """
import json
from alibabacloud_credentials.client import Client
c = Client().get_credential()
print(json.dumps({"id": c.access_key_id, "secret": c.access_key_secret, "token": c.security_token}))
"""


def test_official_alibabacloud_credentials_uri_client(broker, emu, tmp_path):
    pytest.importorskip("alibabacloud_credentials")
    token = add(broker, "sdkhost", "sdk/")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIBABA_CLOUD_")}
    env.update({"ALIBABA_CLOUD_CREDENTIALS_URI": f"{broker.url}/v1/credentials/{token}", "HOME": str(tmp_path),
                "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost"})
    r = subprocess.run([sys.executable, "-c", _SDK_CLIENT], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    creds = json.loads(r.stdout)
    SECRETS.update((creds["secret"], creds["token"]))
    data = os.urandom(4096)
    oss2.Bucket(oss2.StsAuth(creds["id"], creds["secret"], creds["token"]), emu.oss_url, "drop").put_object(
        "sdk/official.bin", data)
    assert root_bucket(emu).get_object("sdk/official.bin").read() == data


# ---------------------------------------------------------------- (f) a burst: one AssumeRole
def test_burst_of_500_costs_one_assume_role(broker, emu):
    token = add(broker, "bursty", "burst/")
    assert sessions(emu, "bursty") == 0

    def one(_):
        status, headers, doc = broker.request("/v1/credentials", token=token)
        return status, headers.get("Retry-After"), doc.get("AccessKeyId")
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(500)))
    codes = [s for s, _, _ in results]
    assert set(codes) <= {200, 429}, set(codes)
    assert codes.count(200) >= 1 and codes.count(429) >= 1
    assert all(ra and int(ra) >= 1 for s, ra, _ in results if s == 429)
    assert len({k for s, _, k in results if s == 200}) == 1    # every 200 is the same cached token
    assert sessions(emu, "bursty") == 1


# ---------------------------------------------------------------- (h) heartbeats and fleet status
def _beat(host, **kw):
    return {"version": "0.1.0", "host": host, "states": {"done": 4, "failed": 1}, "queue": 2, "failures": 1,
            "last_upload": "2026-01-01T00:00:00Z", "credential_expiry": "2030-01-01T00:00:00Z",
            "sent_at": "2026-01-01T00:00:01Z", **kw}


def test_heartbeat_is_stored_and_shown_by_status(broker):
    token = add(broker, "beater", "beat/")
    body = json.dumps(_beat("cam-01")).encode()
    assert broker.request("/v1/heartbeat", token=token, data=body)[0] == 204
    status, _, doc = broker.request("/v1/heartbeat", token=token, data=json.dumps(_beat("cam-01", queue="x")).encode())
    assert status == 400 and "queue" in doc["Message"]
    assert broker.request("/v1/heartbeat", token=token, data=b"{not json")[0] == 400
    assert broker.request("/v1/heartbeat", token="wrong", data=body)[0] == 401
    assert broker.request(f"/v1/heartbeat/{token}", data=json.dumps(_beat("cam-02", queue=0)).encode())[0] == 204
    fleet = json.loads(broker.cli("status", "--json", inprocess=False).stdout)
    [me] = [c for c in fleet["clients"] if c["name"] == "beater"]
    hosts = {h["host"]: h for h in me["hosts"]}
    assert set(hosts) == {"cam-01", "cam-02"}
    assert hosts["cam-01"]["states"] == {"done": 4, "failed": 1} and hosts["cam-01"]["queue"] == 2
    assert hosts["cam-01"]["failures"] == 1 and hosts["cam-01"]["credential_expiry"] == "2030-01-01T00:00:00Z"
    assert hosts["cam-02"]["queue"] == 0 and not hosts["cam-01"]["silent"] and me["last_seen"]
    table = broker.cli("status").stdout
    assert "beater\tcam-01" in table and "done=4 failed=1" in table


def test_status_names_hosts_silent_for_over_three_minutes(tmp_path):
    from ossyncd.broker.cli import fleet_status
    from ossyncd.broker.registry import Registry

    reg = Registry(tmp_path / "r.db")
    reg.add("quiet", "drop", ["q/"], None, None)
    reg.heartbeat("quiet", "h1", _beat("h1"), "127.0.0.1")
    now = time.time()
    assert fleet_status(reg, now + 170)["silent_hosts"] == []
    assert fleet_status(reg, now + 190)["silent_hosts"] == ["quiet/h1"]


# ---------------------------------------------------------------- listener rules, TLS, health, metrics
def test_plain_http_on_a_public_address_is_refused(emu, tmp_path):
    b = Broker(tmp_path, emu, broker={"listen": "0.0.0.0:0"})
    r = ossyncd("broker", "run", "-c", b.config, timeout=60)
    assert r.returncode == 2 and "broker.listen" in r.stderr and "tls_cert" in r.stderr, r.stderr


def test_tls_listener_serves_https(emu, tmp_path):
    cert, key = _self_signed(tmp_path)
    b = Broker(tmp_path, emu, broker={"listen": "0.0.0.0:0", "tls_cert": str(cert), "tls_key": str(key)})
    try:
        b.start()
        assert b.url.startswith("https://")
        url = b.url.replace("0.0.0.0", "127.0.0.1")
        r = requests.get(f"{url}/healthz", verify=str(cert), timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url.replace("https://", "http://") + "/healthz", timeout=5)
    finally:
        b.stop()


def _self_signed(tmp_path: Path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(k, hashes.SHA256()))
    cp, kp = tmp_path / "cert.pem", tmp_path / "key.pem"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return cp, kp


def test_healthz_and_metrics(broker):
    token = add(broker, "metered", "met/")
    assert fetch(broker, token)[0] == 200 and fetch(broker, token)[0] == 200 and fetch(broker, "bad")[0] == 401
    status, _, doc = broker.request("/healthz")
    assert status == 200 and doc["status"] == "ok" and doc["clients"] >= 1
    text = requests.get(f"{broker.url}/metrics", timeout=10).text
    for line in ('ossyncd_broker_issued_total{client="metered"} 1.0', 'ossyncd_broker_cache_hits_total{client="metered"}',
                 'ossyncd_broker_denials_total{reason="unauthorized"}', 'ossyncd_broker_request_seconds_bucket'):
        assert line in text, line
    assert not [s for s in SECRETS if s in text]


def test_healthz_503_when_the_registry_is_unusable(emu, tmp_path):
    b = Broker(tmp_path, emu)
    try:
        b.start()
        assert b.request("/healthz")[0] == 200
        for p in (b.db, Path(f"{b.db}-wal"), Path(f"{b.db}-shm")):
            if p.exists():
                p.write_bytes(b"not a database" * 512)
        status, _, doc = b.request("/healthz")
        assert status == 503 and doc["status"] == "error" and str(b.db) in doc["error"]
        status, headers, doc = b.request("/v1/credentials", token="any")
        assert (status, doc["Code"]) == (503, "ServiceUnavailable") and headers["Retry-After"] == "5"
        assert b.audit()[-1]["reason"] == "registry" and b.audit()[-1]["status"] == 503
    finally:
        b.stop()


# ---------------------------------------------------------------- (g) audit, and no secret anywhere
def test_audit_lines_for_every_decision_and_no_secret_in_any_log(broker, broker_dir, emu):
    token = add(broker, "audited", "aud/")
    status, _, doc = fetch(broker, token)
    assert status == 200
    full_id = doc["AccessKeyId"]
    assert fetch(broker, "not-a-token")[0] == 401
    bad = add(broker, "audited-bad", "aud2/", role="acs:ram::1234567890123456:role/gone")
    assert fetch(broker, bad)[0] == 502
    lines = broker.audit()
    mine = [a for a in lines if a["client"] == "audited"]
    assert mine and mine[-1]["decision"] == "allow" and mine[-1]["session_name"] == "audited"
    # traceable (kind prefix + 4 characters) but never the whole id, in the audit and the registry
    assert full_id.startswith("STS.") and len(full_id) > 12
    assert mine[-1]["access_key_id"] == full_id[:8] + "****", (mine[-1]["access_key_id"], full_id[:8])
    [listed] = [c for c in json.loads(broker.cli("list-clients", "--json").stdout) if c["name"] == "audited"]
    assert listed["last_access_key_id"] == full_id[:8] + "****"
    assert len(mine[-1]["policy_sha256"]) == 64 and mine[-1]["expiry"].endswith("Z")
    assert any(a["decision"] == "deny" and a["status"] == 401 and a["client"] is None for a in lines)
    [denied] = [a for a in lines if a["client"] == "audited-bad"]
    assert (denied["decision"], denied["status"], denied["sts_code"]) == ("deny", 502, "EntityNotExist.Role")
    # one audit line per answered credentials request, allow or deny
    log_decisions = [e for e in broker.log_lines() if e.get("event") in ("broker.issued", "broker.denied")]
    assert len(log_decisions) == len(lines)
    # every file any test of this module wrote: broker log, audit, daemon logs
    base = broker_dir.parent
    texts = [p.read_text(errors="replace") for p in base.rglob("*") if p.is_file() and p.suffix in (".log", ".jsonl")]
    # and every STS secret and token the emulator issued in this module, the daemons' own included
    with emu.authority._lock:
        issued = {x for sess in emu.authority._by_token.values() for x in (sess.secret, sess.token)}
    assert texts and SECRETS and len(issued) >= 2   # at least this test's own token
    leaked = [s[:6] for s in SECRETS | issued for t in texts if s in t]
    assert not leaked, leaked
    assert not [t for t in texts if full_id in t]


# ---------------------------------------------------------------- config
def test_shipped_broker_example_config_is_valid_and_lists_every_key(tmp_path):
    import re

    from ossyncd.broker.config import BrokerSection, load_broker_config

    text = (Path(__file__).parent.parent / "config" / "broker.example.toml").read_text()
    for key in BrokerSection.model_fields:
        assert re.search(rf"^{key} = ", text, re.M), key
    p = tmp_path / "broker.toml"
    p.write_text(text.replace("/var/lib/ossyncd-broker/broker.db", str(tmp_path / "broker.db")))
    cfg = load_broker_config(p)
    assert cfg.broker.audit_path == tmp_path / "audit.jsonl" and cfg.oss.bucket == "my-bucket"


@pytest.mark.parametrize("section,fragment", [
    ('[broker]\nlisten = "nowhere"\n', "broker.listen"),
    ('[broker]\ntls_cert = "/etc/c.pem"\n', "broker.tls_cert/tls_key: set both"),
    ('[broker]\nrole_arn = "uploader"\n', "broker.role_arn"),
    ('[broker]\nrate_limt = 5\n', "broker.rate_limt: unknown key"),
    ('[broker]\nstate = "/nonexistent-dir/b.db"\n', "broker.state: directory /nonexistent-dir"),
    ('[credentials]\nsource = "static"\n', "credentials.access_key_id/access_key_secret"),
])
def test_broker_config_errors_name_the_key(tmp_path, monkeypatch, section, fragment):
    from ossyncd.broker.config import load_broker_config
    from ossyncd.errors import ConfigError

    monkeypatch.delenv("OSSYNCD_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("OSSYNCD_ACCESS_KEY_SECRET", raising=False)
    if "state =" not in section:
        section = section.replace("[broker]\n", f'[broker]\nstate = "{tmp_path}/b.db"\n')
        if "[broker]" not in section:
            section += f'[broker]\nstate = "{tmp_path}/b.db"\n'
    p = tmp_path / "broker.toml"
    p.write_text(section)
    with pytest.raises(ConfigError) as e:
        load_broker_config(p)
    assert fragment in str(e.value), str(e.value)


def test_unix_socket_listener(emu, tmp_path):
    import socket

    sock_path = tmp_path / "b.sock"
    b = Broker(tmp_path, emu, broker={"listen": str(sock_path)})
    try:
        b.start()
        assert b.url == f"unix:{sock_path}" and (sock_path.stat().st_mode & 0o777) == 0o660
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(sock_path))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: broker\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["status"] == "ok"
    finally:
        b.stop()
    assert not sock_path.exists()


# ---------------------------------------------------------------- soak: down longer than a token lives
@pytest.mark.soak
def test_broker_down_longer_than_a_token_lives_files_wait_then_recover(emu, daemon_factory, tmp_path):
    b = Broker(tmp_path, emu, name="short", broker={"max_duration": 4})
    b.start()
    try:
        token = add(b, "shortlived", "short/")
        d, watch = daemon_for(daemon_factory, b, emu, tmp_path, "shortlived", token, "short/")
        sent = {"short/a.txt": random_file(watch / "a.txt", 1000, seed=1)}
        d.start()
        d.wait_states({"done": 1}, timeout=60)
        b.stop()
        down_at = time.time()
        from ossyncd.credentials.base import parse_expiration

        def expired():   # every token the daemon could hold has expired
            exp = d.status()["credentials"]["expires_at"]
            return time.time() > down_at + 4 and exp and parse_expiration(exp) < time.time()
        wait_until(expired, 30, interval=0.5, what="the daemon's credentials to expire")
        sent["short/b.txt"] = random_file(watch / "b.txt", 2000, seed=2)
        wait_until(lambda: [f for f in d.files() if f["path"].endswith("b.txt") and f["state"] == "retry_wait"], 30,
                   interval=0.5, what="b.txt waiting for credentials")
        t_wait = time.time()
        wait_until(lambda: time.time() > t_wait + 5, 10, interval=0.5)   # it keeps waiting, never failing
        assert not d.files("failed")
        b.start()
        up_at = time.monotonic()
        d.wait_states({"done": 2}, timeout=30)
        print(f"recovered {time.monotonic() - up_at:.1f} s after the broker came back")
        for key, data in sent.items():
            assert root_bucket(emu).get_object(key).read() == data
        assert not d.files("failed")
    finally:
        b.stop()


def test_client_policy_shape_and_limits():
    from ossyncd.broker.policy import client_policy
    from ossyncd.errors import PolicyTooLong

    doc = json.loads(client_policy("drop", ["a/", "b/c/"]))
    objects, listing = doc["Statement"]
    assert objects["Resource"] == ["acs:oss:*:*:drop/a/*", "acs:oss:*:*:drop/b/c/*"]
    assert "oss:ListMultipartUploads" not in objects["Action"] and "oss:GetObject" not in objects["Action"]
    assert listing == {"Effect": "Allow", "Action": ["oss:ListMultipartUploads"], "Resource": ["acs:oss:*:*:drop"],
                       "Condition": {"StringLike": {"oss:Prefix": ["a/*", "b/c/*"]}}}
    assert "Condition" not in json.loads(client_policy("drop", ["a/"], prefix_condition=False))["Statement"][1]
    with pytest.raises(PolicyTooLong) as e:
        client_policy("drop", [f"{'x' * 60}{i}/" for i in range(30)])
    assert "list_prefix_condition" in str(e.value)
