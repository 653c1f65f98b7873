"""Credentials for a registered client: the cache, the rate limits and the AssumeRole call.

* A client's token is reused until less than a third of its life remains (measured from the
  fetch); one refresh in flight per client (a lock each: concurrent requests wait for it and
  share its result).
* ``broker.rate_limit`` is a token bucket on AssumeRole calls for all clients together (STS
  allows about 100 per second per account); ``broker.client_rate_limit`` one per client on
  every request. Either answers 429 with Retry-After.
* AssumeRole goes through credentials/sts.py (the one STS module), signed with the broker's
  own identity: any [credentials] source, behind a RotatingCredentials so a role or RRSA
  identity is not fetched again for every call.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ossyncd.config import CredentialsConfig
from ossyncd.credentials import RotatingCredentials, StsSource, build_source
from ossyncd.credentials.base import Snapshot, iso8601
from ossyncd.credentials.sts import sts_endpoint
from ossyncd.errors import CredentialsError, PolicyError

from .config import BrokerConfig
from .policy import client_policy, policy_hash
from .registry import Client


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``. take() -> 0 (taken) or the seconds
    until one is there."""

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.rate = float(rate)
        self.burst = max(1.0, float(burst if burst is not None else rate))
        self._tokens = self.burst
        self._clock = clock
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate


@dataclass(frozen=True)
class Issued:
    snap: Snapshot
    fetched_at: float
    grant: tuple            # what the token was issued for: a changed registration misses the cache
    policy_sha256: str
    session_name: str

    def fresh(self, now: float) -> bool:
        """More than a third of its life left."""
        if self.snap.expires_at is None:
            return True
        life = self.snap.expires_at - self.fetched_at
        return self.snap.expires_at - now > life / 3.0


class Refused(Exception):
    """An answer other than 200: the HTTP status, the JSON body and extra headers."""

    def __init__(self, status: int, code: str, message: str, *, reason: str, headers: dict | None = None,
                 permanent: bool | None = None, sts_code: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.reason = status, code, message, reason
        self.headers = headers or {}
        self.permanent = permanent
        self.sts_code = sts_code

    def body(self) -> dict:
        doc: dict = {"Code": self.code, "Message": self.message}
        if self.permanent is not None:
            doc["Permanent"] = self.permanent
        return doc


def retry_after(seconds: float) -> dict:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class _OwnIdentity:
    """The broker's own keys as a Source for StsSource(base=...): the rotator's current snapshot."""

    name = "broker-identity"

    def __init__(self, rotating: RotatingCredentials):
        self._rotating = rotating

    def fetch(self) -> Snapshot:
        return self._rotating.current()


class Issuer:
    def __init__(self, cfg: BrokerConfig, *, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self._clock = clock
        cc: CredentialsConfig = cfg.credentials
        own = build_source(cc, bucket=cfg.oss.bucket or "broker", prefixes=[""])
        self.identity = RotatingCredentials(own, min_backoff=cc.retry_backoff, max_backoff=cc.retry_backoff_max)
        self._base = _OwnIdentity(self.identity)
        self._endpoint = sts_endpoint(cc.sts_endpoint if "sts_endpoint" in cc.model_fields_set else None,
                                      region=cc.sts_region)
        self._global = TokenBucket(cfg.broker.rate_limit)
        self._lock = threading.Lock()
        self._client_locks: dict[str, threading.Lock] = {}
        self._client_buckets: dict[str, TokenBucket] = {}
        self._cache: dict[str, Issued] = {}

    # ----- limits
    def admit(self, client: Client) -> None:
        """The per-client limit, on every request. Refused(429) when over it."""
        with self._lock:
            bucket = self._client_buckets.get(client.name)
            if bucket is None:
                bucket = self._client_buckets[client.name] = TokenBucket(self.cfg.broker.client_rate_limit)
        wait = bucket.take()
        if wait:
            raise Refused(429, "Throttling", f"client {client.name} is over broker.client_rate_limit "
                          f"({self.cfg.broker.client_rate_limit:g}/s); retry later", reason="client_rate_limit",
                          headers=retry_after(wait))

    # ----- issue
    def grant(self, client: Client) -> tuple:
        return (client.bucket, client.prefixes, self.duration(client), self.role(client))

    def duration(self, client: Client) -> int:
        limit = self.cfg.broker.max_duration
        return min(client.max_duration or limit, limit)

    def role(self, client: Client) -> str:
        role = client.role_arn or self.cfg.broker.role_arn
        if not role:
            raise Refused(502, "NoRole", f"client {client.name} has no role: set broker.role_arn or register it "
                          "with --role", reason="config", permanent=True)
        return role

    def get(self, client: Client) -> tuple[Issued, bool]:
        """(the client's credentials, True when served from the cache). Refused for STS errors
        (503 transient, 502 permanent) and the global limit (429)."""
        grant = self.grant(client)
        cached = self._cache.get(client.name)
        if cached is not None and cached.grant == grant and cached.fresh(self._clock()):
            return cached, True
        with self._lock:
            lock = self._client_locks.setdefault(client.name, threading.Lock())
        with lock:       # one refresh in flight per client; the others wait and take its result
            cached = self._cache.get(client.name)
            if cached is not None and cached.grant == grant and cached.fresh(self._clock()):
                return cached, True
            wait = self._global.take()
            if wait:
                raise Refused(429, "Throttling", f"the broker is over broker.rate_limit "
                              f"({self.cfg.broker.rate_limit:g} AssumeRole/s); retry later", reason="rate_limit",
                              headers=retry_after(wait))
            issued = self._assume(client, grant)
            self._cache[client.name] = issued
            return issued, False

    def _assume(self, client: Client, grant: tuple) -> Issued:
        bucket, prefixes, duration, role = grant
        try:
            policy = client_policy(bucket, prefixes, prefix_condition=self.cfg.broker.list_prefix_condition)
        except PolicyError as e:
            raise Refused(502, "PolicyTooLong", f"client {client.name}: {e}", reason="policy", permanent=True) from None
        src = StsSource(base=self._base, role_arn=role, session_name=client.name, duration_seconds=duration,
                        region=self.cfg.credentials.sts_region, policy=policy, endpoint=self._endpoint,
                        timeout=self.cfg.credentials.timeout_seconds, key_from="the broker's [credentials]")
        started = self._clock()
        try:
            snap = src.fetch()
        except CredentialsError as e:
            code = e.code or "STSError"
            raise Refused(503 if e.transient else 502, code, str(e), reason="sts", permanent=not e.transient,
                          sts_code=code, headers=retry_after(5) if e.transient else None) from None
        return Issued(snap, started, grant, policy_hash(policy), client.name)


def answer(issued: Issued, client: Client, cfg: BrokerConfig) -> dict:
    """The credentials-URI document the official SDKs read, with what a host's config needs."""
    s = issued.snap
    return {"Code": "Success", "AccessKeyId": s.access_key_id, "AccessKeySecret": s.access_key_secret,
            "SecurityToken": s.security_token, "Expiration": iso8601(s.expires_at),
            "LastUpdated": iso8601(issued.fetched_at),
            "Bucket": client.bucket, "Region": cfg.oss.region, "Endpoint": cfg.oss.endpoint,
            "Prefixes": list(client.prefixes)}
