"""Pure-logic tests for ossyncd.credentials / ossyncd.policy (fake clock, fake Source)."""

from __future__ import annotations

import json
import logging
import math
import threading
import time

import pytest
from structlog.testing import capture_logs

from ossyncd import credentials as C
from ossyncd import policy as P
from ossyncd.config import CredentialsConfig
from ossyncd.credentials import CredentialsError, RotatingCredentials, Snapshot
from ossyncd.credentials.http import _find_credentials_dict
from ossyncd.credentials.sts import _install_sdk_log_filter

pytestmark = pytest.mark.timeout(30)

SECRET = "unit-SECRET-0f9e8d7c6b5a"
TOKEN = "unit-TOKEN-aabbccddeeff00112233"


class FakeClock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


class FakeSource:
    """Our own seam: returns snapshots with a fixed lifetime, or raises scripted errors."""

    name = "fake"

    def __init__(self, clock, lifetime: float | None = 100.0, delay: float = 0.0):
        self.clock = clock
        self.lifetime = lifetime
        self.delay = delay
        self.fetches = 0
        self.errors: list[CredentialsError] = []   # raised first, in order
        self.fail_with: CredentialsError | None = None  # raised on every fetch while set
        self._lock = threading.Lock()

    def fetch(self) -> Snapshot:
        with self._lock:
            self.fetches += 1
            n = self.fetches
        if self.delay:
            time.sleep(self.delay)
        if self.errors:
            raise self.errors.pop(0)
        if self.fail_with is not None:
            raise self.fail_with
        exp = None if self.lifetime is None else self.clock() + self.lifetime
        return Snapshot(f"STS.KEYID{n:04d}xyz", f"{SECRET}-{n}", f"{TOKEN}-{n}", exp)


def transient(msg="STS endpoint http://x unreachable: connection refused"):
    return CredentialsError(msg, transient=True, source="fake")


def permanent(msg="AssumeRole on http://x failed: EntityNotExist.Role: the role does not exist"):
    return CredentialsError(msg, transient=False, source="fake")


def make(lifetime=100.0, delay=0.0, rng=lambda: 1.0, **kw):
    clock = FakeClock()
    src = FakeSource(clock, lifetime, delay)
    rc = RotatingCredentials(src, clock=clock, rng=rng, **kw)
    return clock, src, rc


def assert_no_secret(text: str):
    assert SECRET not in text and TOKEN not in text, text


# ------------------------------------------------------------------ Snapshot & parsing


def test_snapshot_repr_and_str_redact_secrets():
    s = Snapshot("STS.NKeyIdForTests123", SECRET, TOKEN, 1_700_000_000.0)
    for text in (repr(s), str(s), f"{s}", "%s" % (s,), repr([s]), repr({"s": s})):
        assert_no_secret(text)
        assert "<redacted>" in text
        assert "2023-11-14T22:13:20Z" in text
    assert "STS.NKeyIdForTests123" not in repr(s)  # masked, but recognisable
    assert "STS.NK" in repr(s)
    s2 = Snapshot("LTAIstatic", SECRET, None, None)
    assert_no_secret(repr(s2))
    assert "security_token=None" in repr(s2)


def test_snapshot_is_frozen_and_compares_by_value():
    s = Snapshot("a", "b", "c", 1.0)
    with pytest.raises(Exception):
        s.access_key_id = "x"  # type: ignore[misc]
    assert s == Snapshot("a", "b", "c", 1.0)
    assert s.expired(1.0) and not s.expired(0.5)
    assert not Snapshot("a", "b", None, None).expired(1e12)


@pytest.mark.parametrize("value,expected", [
    ("2015-04-09T11:52:19Z", 1428580339.0),
    ("2015-04-09T11:52:19.250Z", 1428580339.25),
    ("2015-04-09T19:52:19+08:00", 1428580339.0),
    ("2015-04-09T19:52:19+0800", 1428580339.0),
    ("2015-04-09T06:52:19-05:00", 1428580339.0),
    ("2015-04-09T11:52:19", 1428580339.0),
    ("2015-04-09 11:52:19Z", 1428580339.0),
    (1428580339, 1428580339.0),
    (1428580339.5, 1428580339.5),
    ("1428580339", 1428580339.0),
    (1428580339000, 1428580339.0),  # milliseconds
])
def test_parse_expiration(value, expected):
    assert C.parse_expiration(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["tomorrow", "", None, True, -5, "2015-13-45T99:00:00Z"])
def test_parse_expiration_rejects(value):
    with pytest.raises(ValueError):
        C.parse_expiration(value)


def test_credentials_error_shape():
    e = CredentialsError("broker http://b answered HTTP 503; will retry", transient=True, source="broker",
                         code="HTTP503")
    assert str(e) == "broker http://b answered HTTP 503; will retry"
    assert e.transient and e.source == "broker" and e.code == "HTTP503"
    c = e.copy()
    assert c is not e and str(c) == str(e) and c.transient and c.code == "HTTP503"
    assert not CredentialsError("x").transient


# ------------------------------------------------------------------ rotation timing


def test_first_tick_fetches_and_schedules_at_80_percent():
    clock, src, rc = make(lifetime=100.0)
    t0 = clock()
    nxt = rc.tick(t0)
    assert src.fetches == 1
    assert nxt == pytest.approx(t0 + 80.0)
    # not before
    for dt in (1, 40, 79.9):
        clock.t = t0 + dt
        assert rc.tick(clock()) == pytest.approx(t0 + 80.0)
    assert src.fetches == 1
    first = rc.current()
    clock.t = t0 + 80.0
    nxt = rc.tick(clock())
    assert src.fetches == 2
    second = rc.current()
    assert second != first
    assert nxt == pytest.approx(clock.t + 80.0)


def test_refresh_fraction_is_configurable():
    clock, src, rc = make(lifetime=3600.0, refresh_fraction=0.5)
    assert rc.tick(clock()) == pytest.approx(clock() + 1800.0)


def test_current_on_empty_provider_fetches_synchronously_and_caches():
    clock, src, rc = make()
    s1 = rc.current()
    s2 = rc.current()
    assert s1 is s2 and src.fetches == 1
    clock.advance(99)
    assert rc.current() is s1 and src.fetches == 1  # still valid: no refresh from current()
    clock.advance(1)  # expired
    s3 = rc.current()
    assert s3 != s1 and src.fetches == 2


def test_static_source_without_expiry_never_refreshes():
    clock, src, rc = make(lifetime=None)
    assert rc.tick(clock()) == math.inf
    s = rc.current()
    for dt in (1e3, 1e6, 1e9):
        clock.advance(dt)
        assert rc.tick(clock()) == math.inf
        assert rc.current() is s
    assert src.fetches == 1
    st = rc.status()
    assert st["expires_at"] is None and st["next_attempt_at"] is None and st["healthy"]


def test_failed_refresh_keeps_credentials_until_expiry_with_exponential_backoff():
    clock, src, rc = make(lifetime=1000.0, rng=lambda: 1.0, min_backoff=1.0, max_backoff=16.0)
    t0 = clock()
    rc.tick(t0)
    good = rc.current()
    src.fail_with = transient()
    clock.t = t0 + 800
    delays = []
    for _ in range(7):
        now = clock()
        nxt = rc.tick(now)
        delays.append(round(nxt - now, 6))
        assert rc.current() is good  # still valid: kept
        clock.t = nxt
    assert delays == [1, 2, 4, 8, 16, 16, 16]
    assert src.fetches == 1 + 7
    st = rc.status()
    assert st["healthy"] and st["last_error"].startswith("STS endpoint") and st["consecutive_failures"] == 7


def test_unavailable_only_while_the_last_fetch_failed_and_nothing_usable_is_held():
    """The scheduler holds its queue on this: never before a first fetch, never while a failed
    refresh still has a valid snapshot, and no longer once a fetch succeeds."""
    clock, src, rc = make(lifetime=100.0, min_backoff=1.0, max_backoff=4.0)
    assert rc.unavailable() is None                      # nothing fetched yet: a request fetches
    src.fail_with = transient()
    rc.tick(clock())
    err = rc.unavailable()
    assert err is not None and str(err).startswith("STS endpoint")
    src.fail_with = None
    clock.t = rc.tick(clock())                             # in backoff: still unavailable
    assert rc.unavailable() is not None
    rc.tick(clock())
    assert rc.unavailable() is None and rc.status()["healthy"]
    src.fail_with = transient()
    clock.advance(80)
    rc.tick(clock())                                       # refresh failed, old one still valid
    assert rc.unavailable() is None
    clock.advance(21)                                      # and now it has expired
    assert rc.unavailable() is not None


def test_backoff_jitter_stays_within_half_to_full_and_cap():
    import random
    seed = 1234
    r = random.Random(seed)
    clock, src, rc = make(lifetime=100.0, rng=r.random, min_backoff=1.0, max_backoff=60.0)
    rc.tick(clock())
    src.fail_with = transient()
    clock.advance(80)
    seen = []
    for n in range(1, 12):
        now = clock()
        nxt = rc.tick(now)
        base = min(60.0, 2.0 ** (n - 1))
        d = nxt - now
        assert base / 2 <= d <= base, f"seed={seed} n={n} delay={d}"
        seen.append(d)
        clock.t = nxt
    assert len({round(x, 9) for x in seen}) == len(seen)  # jittered, not fixed


def test_jitter_lower_bound_with_rng_zero():
    clock, src, rc = make(rng=lambda: 0.0, min_backoff=2.0, max_backoff=60.0)
    src.fail_with = transient()
    now = clock()
    assert rc.tick(now) - now == pytest.approx(1.0)


def test_permanent_error_backs_off_at_the_cap():
    clock, src, rc = make(rng=lambda: 1.0, min_backoff=1.0, max_backoff=60.0)
    src.fail_with = permanent()
    now = clock()
    assert rc.tick(now) - now == pytest.approx(60.0)
    assert rc.status()["last_error"].startswith("AssumeRole on http://x failed: EntityNotExist.Role")


def test_after_expiry_with_failures_current_raises_and_respects_backoff():
    clock, src, rc = make(lifetime=100.0, rng=lambda: 1.0, min_backoff=1.0, max_backoff=8.0)
    t0 = clock()
    rc.tick(t0)
    src.fail_with = transient("STS endpoint http://x unreachable: connection refused")
    t = t0 + 80
    while t < t0 + 100:
        t = rc.tick(t)
    clock.t = t0 + 100.0  # expired now
    fetches = src.fetches
    with pytest.raises(CredentialsError) as ei:
        rc.current()
    assert ei.value.transient and "unreachable" in str(ei.value)
    # inside the backoff window current() does not hit the source again
    with pytest.raises(CredentialsError):
        rc.current()
    assert src.fetches in (fetches, fetches + 1)
    st = rc.status()
    assert not st["healthy"] and "unreachable" in st["last_error"]
    # recovery resets everything
    src.fail_with = None
    clock.t = rc.tick(clock.t) if rc.status()["consecutive_failures"] else clock.t
    clock.advance(10)
    s = rc.current()
    assert not s.expired(clock())
    st = rc.status()
    assert st["healthy"] and st["last_error"] is None and st["consecutive_failures"] == 0


def test_error_on_empty_provider_is_raised_and_then_retried_after_backoff():
    clock, src, rc = make(rng=lambda: 1.0, min_backoff=5.0)
    src.errors = [transient(), transient()]
    with pytest.raises(CredentialsError):
        rc.current()
    assert src.fetches == 1
    clock.advance(1)
    with pytest.raises(CredentialsError):
        rc.current()          # in backoff: no fetch
    assert src.fetches == 1
    clock.advance(4)
    with pytest.raises(CredentialsError):
        rc.current()          # backoff over: second (failing) fetch
    assert src.fetches == 2
    clock.advance(10)
    assert rc.current().access_key_id.startswith("STS.")
    assert src.fetches == 3


def test_credentials_expired_on_arrival_are_rejected():
    clock = FakeClock()

    class Skewed(FakeSource):
        def fetch(self):
            return Snapshot("STS.x", SECRET, TOKEN, self.clock() - 5)

    rc = RotatingCredentials(Skewed(clock), clock=clock, rng=lambda: 1.0)
    with pytest.raises(CredentialsError, match="check the system clock") as ei:
        rc.current()
    assert ei.value.transient
    assert_no_secret(str(ei.value))


def test_unexpected_exception_in_source_becomes_transient_error_without_text():
    clock = FakeClock()

    class Buggy(FakeSource):
        def fetch(self):
            raise KeyError(SECRET)

    rc = RotatingCredentials(Buggy(clock), clock=clock)
    with pytest.raises(CredentialsError) as ei:
        rc.current()
    assert ei.value.transient and "KeyError" in str(ei.value)
    assert_no_secret(str(ei.value))
    assert_no_secret(json.dumps(rc.status()))


# ------------------------------------------------------------------ force_refresh


def test_force_refresh_with_already_rotated_stale_does_not_fetch():
    clock, src, rc = make()
    old = rc.current()
    clock.advance(80)
    rc.tick(clock())
    new = rc.current()
    assert new != old and src.fetches == 2
    assert rc.force_refresh(old) is new
    assert src.fetches == 2


def test_force_refresh_with_current_stale_fetches_once():
    clock, src, rc = make()
    s = rc.current()
    n = rc.force_refresh(s)
    assert n != s and src.fetches == 2
    assert rc.force_refresh(s) is n and src.fetches == 2  # a late caller with the same stale one
    # an equal-valued copy of the stale snapshot is recognised too
    copy_of_n = Snapshot(n.access_key_id, n.access_key_secret, n.security_token, n.expires_at)
    n2 = rc.force_refresh(copy_of_n)
    assert n2 != n and src.fetches == 3


def test_force_refresh_without_stale_always_fetches():
    clock, src, rc = make()
    rc.current()
    rc.force_refresh()
    rc.force_refresh()
    assert src.fetches == 3


def test_rejected_snapshot_is_not_handed_out_when_refresh_fails():
    clock, src, rc = make(rng=lambda: 1.0)
    s = rc.current()
    src.fail_with = transient()
    with pytest.raises(CredentialsError):
        rc.force_refresh(s)
    with pytest.raises(CredentialsError):
        rc.current()  # OSS refused s: uploads wait instead of looping on it
    assert not rc.status()["healthy"]
    src.fail_with = None
    clock.t = rc.tick(clock())  # wait out the backoff (this tick is before the retry time)
    rc.tick(clock())
    assert rc.current() != s and rc.status()["healthy"]


def test_force_refresh_of_static_credentials_refetches_and_returns_them():
    clock, src, rc = make(lifetime=None)
    s = rc.current()

    class Same(FakeSource):
        def fetch(self):
            self.fetches += 1
            return Snapshot(s.access_key_id, s.access_key_secret, s.security_token, None)

    same = Same(clock)
    rc2 = RotatingCredentials(same, clock=clock)
    s2 = rc2.current()
    assert rc2.force_refresh(s2) == s2
    assert rc2.current() == s2 and same.fetches == 2


# ------------------------------------------------------------------ single flight


def _run_threads(n, fn):
    barrier = threading.Barrier(n)
    results, errors = [None] * n, [None] * n

    def worker(i):
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as e:  # noqa: BLE001
            errors[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    return results, errors


def test_single_flight_current_on_empty_provider():
    clock = FakeClock()
    src = FakeSource(clock, lifetime=100.0, delay=0.2)
    rc = RotatingCredentials(src, clock=clock)
    for round_no in range(1, 4):
        results, errors = _run_threads(16, rc.current)
        assert errors == [None] * 16
        assert src.fetches == round_no, f"round {round_no}: {src.fetches} fetches"
        assert len({id(r) for r in results}) == 1
        clock.advance(100)  # expire: next round starts from an unusable snapshot


def test_single_flight_force_refresh_with_stale():
    clock = FakeClock()
    src = FakeSource(clock, lifetime=100.0, delay=0.2)
    rc = RotatingCredentials(src, clock=clock)
    stale = rc.current()
    for round_no in range(1, 4):
        results, errors = _run_threads(16, lambda: rc.force_refresh(stale))
        assert errors == [None] * 16
        assert src.fetches == 1 + round_no
        assert len({id(r) for r in results}) == 1 and results[0] != stale
        stale = results[0]


def test_single_flight_shares_a_failure():
    clock = FakeClock()
    src = FakeSource(clock, lifetime=100.0, delay=0.2)
    src.fail_with = transient()
    rc = RotatingCredentials(src, clock=clock, min_backoff=0.0, max_backoff=0.0)
    results, errors = _run_threads(16, rc.current)
    assert src.fetches == 1
    assert all(isinstance(e, CredentialsError) and e.transient for e in errors)


def test_tick_while_a_refresh_is_in_flight_does_not_fetch_again():
    clock = FakeClock()
    src = FakeSource(clock, lifetime=100.0, delay=0.3)
    rc = RotatingCredentials(src, clock=clock)
    t = threading.Thread(target=rc.current)
    t.start()
    time.sleep(0.1)
    now = clock()
    assert rc.tick(now) == pytest.approx(now + 0.05)
    t.join(5)
    assert src.fetches == 1


# ------------------------------------------------------------------ status, logs, thread


def test_status_and_logs_hold_no_secrets():
    clock, src, rc = make(rng=lambda: 1.0)
    with capture_logs() as logs:
        rc.current()
        st = rc.status()
        assert set(st) >= {"source", "expires_at", "last_refresh_at", "last_error", "next_attempt_at", "healthy"}
        assert st["source"] == "fake" and st["healthy"] is True and st["last_error"] is None
        assert st["expires_at"].endswith("Z") and st["last_refresh_at"].endswith("Z")
        rc.force_refresh(rc.current())
        src.fail_with = transient()
        clock.advance(80)
        rc.tick(clock())
        st2 = rc.status()
    blob = json.dumps([st, st2]) + repr(rc) + repr(logs)
    assert_no_secret(blob)
    events = [e["event"] for e in logs]
    assert events.count("credentials.refreshed") == 2
    assert "credentials.rejected_by_server" in events and "credentials.refresh_failed" in events
    failed = [e for e in logs if e["event"] == "credentials.refresh_failed"][0]
    assert failed["log_level"] == "warning" and failed["transient"] is True


def test_status_before_first_fetch():
    clock, src, rc = make()
    st = rc.status()
    assert st["healthy"] is False and st["expires_at"] is None and st["last_refresh_at"] is None
    assert st["next_attempt_at"] is not None


def test_thread_loop_rotates_and_stops_promptly():
    src = FakeSource(time.time, lifetime=0.5)
    rc = RotatingCredentials(src, min_backoff=0.05, max_backoff=0.2)
    rc.start()
    try:
        deadline = time.time() + 5
        while src.fetches < 4 and time.time() < deadline:
            time.sleep(0.02)
        assert src.fetches >= 4
        assert rc.status()["healthy"]
    finally:
        t0 = time.monotonic()
        rc.stop()
        assert time.monotonic() - t0 < 1.0
    n = src.fetches
    time.sleep(0.6)
    assert src.fetches == n


def test_stop_wakes_a_long_sleep():
    src = FakeSource(time.time, lifetime=None)
    rc = RotatingCredentials(src)
    rc.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    rc.stop()
    assert time.monotonic() - t0 < 1.0
    assert src.fetches == 1


# ------------------------------------------------------------------ build_source


def cfg(**kw):
    base = dict(source="sts", access_key_id="LTAIuserkeyid", access_key_secret=SECRET, security_token="",
                role_arn="acs:ram::1234567890123456:role/uploader", session_name="ossyncd",
                duration_seconds=3600, sts_endpoint="http://127.0.0.1:9100", sts_region="cn-hangzhou",
                policy="", scope_policy_to_prefixes=False, broker_url="", broker_token="", broker_headers={},
                ecs_role_name="", timeout_seconds=10.0)
    base.update(kw)
    return CredentialsConfig(**base)


def test_build_sts_source_endpoint_handling():
    s = C.build_source(cfg(), bucket="drop", prefixes=["incoming/"])
    assert isinstance(s, C.StsSource) and s.name == "sts"
    assert s.endpoint == "http://127.0.0.1:9100" and s._hostport == "127.0.0.1:9100" and s._scheme == "http"
    assert s.policy is None
    s = C.build_source(cfg(sts_endpoint="https://sts.cn-shanghai.aliyuncs.com"), bucket="drop", prefixes=[])
    assert s._scheme == "https" and s._hostport == "sts.cn-shanghai.aliyuncs.com"
    s = C.build_source(cfg(sts_endpoint="", sts_region="cn-beijing"), bucket="drop", prefixes=[])
    assert s.endpoint == "https://sts.cn-beijing.aliyuncs.com"
    req = s._request()
    assert req.get_RoleArn() == "acs:ram::1234567890123456:role/uploader"
    assert req.get_RoleSessionName() == "ossyncd" and req.get_DurationSeconds() == 3600
    assert req.get_Policy() is None and req.get_protocol_type() == "https"
    assert isinstance(s, C.Source)
    assert_no_secret(repr(s))


def test_build_sts_scoped_policy():
    s = C.build_source(cfg(scope_policy_to_prefixes=True), bucket="drop", prefixes=["incoming/", "raw/"])
    doc = json.loads(s.policy)
    assert doc["Statement"][0]["Resource"] == ["acs:oss:*:*:drop/incoming/*", "acs:oss:*:*:drop/raw/*"]
    assert s._request().get_Policy() == s.policy


def test_build_sts_custom_policy_is_compacted():
    pol = json.dumps(P.upload_policy("drop", ["x/"]), indent=4)
    s = C.build_source(cfg(policy=pol), bucket="drop", prefixes=[])
    assert s.policy == json.dumps(json.loads(pol), separators=(",", ":"))


def test_build_other_sources():
    b = C.build_source(cfg(source="broker", broker_url="https://broker/x", broker_token="tok",
                           broker_headers={"X-A": "1"}), bucket="drop", prefixes=[])
    assert isinstance(b, C.BrokerSource) and b.name == "broker"
    e = C.build_source(cfg(source="ecs-ram-role", ecs_metadata_url="http://127.0.0.1:1/meta"),
                       bucket="drop", prefixes=[])
    assert isinstance(e, C.EcsRamRoleSource) and e.metadata_url == "http://127.0.0.1:1/meta/"
    assert C.build_source(cfg(source="env"), bucket="drop", prefixes=[]).name == "env"
    st = C.build_source(cfg(source="static", security_token=TOKEN), bucket="drop", prefixes=[])
    snap = st.fetch()
    assert snap == Snapshot("LTAIuserkeyid", SECRET, TOKEN, None)
    st = C.build_source(cfg(source="static"), bucket="drop", prefixes=[])
    assert st.fetch().security_token is None


def test_env_source_reads_at_fetch_time_and_names_missing_variables():
    env = {}
    src = C.EnvSource(env)
    with pytest.raises(CredentialsError) as ei:
        src.fetch()
    assert "OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET are not set" in str(ei.value)
    assert not ei.value.transient
    env["OSS_ACCESS_KEY_ID"] = "LTAIenv"
    with pytest.raises(CredentialsError, match="OSS_ACCESS_KEY_SECRET is not set"):
        src.fetch()
    env["OSS_ACCESS_KEY_SECRET"] = SECRET
    assert src.fetch() == Snapshot("LTAIenv", SECRET, None, None)
    env["OSS_SESSION_TOKEN"] = TOKEN
    assert src.fetch().security_token == TOKEN


def test_find_credentials_dict_wrappers():
    inner = {"AccessKeyId": "a", "AccessKeySecret": "b", "SecurityToken": "c", "Expiration": 1}
    f = _find_credentials_dict
    assert f(inner) is inner
    for key in ("result", "data", "credentials", "Credentials", "whatever"):
        assert f({key: inner, "code": 0}) is inner
    assert f({"RequestId": "r", "AssumedRoleUser": {"Arn": "x"}, "Credentials": inner}) is inner
    assert f({"data": {"credentials": inner}}) is inner
    assert f({"a": inner, "b": dict(inner)}) is None  # ambiguous
    assert f({"accessKeyId": "a"}) is not None        # case-insensitive keys
    assert f([inner]) is None


def test_sdk_response_body_log_records_are_dropped(caplog):
    _install_sdk_log_filter()
    sdk_log = logging.getLogger("aliyunsdkcore.client")
    with caplog.at_level(logging.DEBUG, logger="aliyunsdkcore.client"):
        sdk_log.debug("Response received. Product:%s Response-body: %s", "Sts", SECRET)
        sdk_log.debug("Request received. Product:%s", "Sts")
    assert_no_secret(caplog.text)
    assert "Request received" in caplog.text


# ------------------------------------------------------------------ policy.py


def test_upload_actions_are_the_eight():
    assert set(P.UPLOAD_ACTIONS) == {
        "oss:PutObject", "oss:InitiateMultipartUpload", "oss:UploadPart", "oss:UploadPartCopy",
        "oss:CompleteMultipartUpload", "oss:AbortMultipartUpload", "oss:ListMultipartUploads", "oss:ListParts"}
    assert len(P.UPLOAD_ACTIONS) == 8


def test_upload_policy_document():
    doc = P.upload_policy("drop", ["incoming/", "scans/2024/"])
    assert doc["Version"] == "1"
    obj, bkt = doc["Statement"]
    assert obj["Effect"] == bkt["Effect"] == "Allow"
    assert set(obj["Action"]) | set(bkt["Action"]) == set(P.UPLOAD_ACTIONS)
    assert obj["Resource"] == ["acs:oss:*:*:drop/incoming/*", "acs:oss:*:*:drop/scans/2024/*"]
    assert bkt["Action"] == ["oss:ListMultipartUploads"] and bkt["Resource"] == ["acs:oss:*:*:drop"]
    actions = [a for st in doc["Statement"] for a in st["Action"]]
    assert sorted(actions) == sorted(P.UPLOAD_ACTIONS)  # nothing else: no Get/Head/ListObjects, no oss:*


@pytest.mark.parametrize("prefixes,expected", [
    ([""], ["acs:oss:*:*:drop/*"]),
    ([], ["acs:oss:*:*:drop/*"]),
    (["a/", ""], ["acs:oss:*:*:drop/*"]),
    (["a/", "a/b/", "a/"], ["acs:oss:*:*:drop/a/*"]),
    (["/lead/"], ["acs:oss:*:*:drop/lead/*"]),
    (["b/", "a/"], ["acs:oss:*:*:drop/a/*", "acs:oss:*:*:drop/b/*"]),
])
def test_policy_prefix_resources(prefixes, expected):
    assert P.upload_policy("drop", prefixes)["Statement"][0]["Resource"] == expected


def test_inline_policy_json_is_compact_and_bounded():
    text = P.inline_policy_json("drop", ["incoming/"])
    assert " " not in text and json.loads(text) == P.upload_policy("drop", ["incoming/"])
    assert len(text) <= 2048
    many = [f"p{i:04d}/" for i in range(200)]
    with pytest.raises(P.PolicyTooLong) as ei:
        P.inline_policy_json("drop", many)
    assert "p0000/" in str(ei.value) and "2048" in str(ei.value)


def test_policy_rejects_bad_bucket():
    with pytest.raises(P.PolicyError, match="oss.bucket"):
        P.upload_policy("", ["x/"])
    with pytest.raises(P.PolicyError):
        P.upload_policy("a/b", ["x/"])
