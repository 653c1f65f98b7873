"""Credential sources and rotation.

Sources (``build_source``) each make ONE network attempt per ``fetch()`` and
return an immutable ``Snapshot`` or raise ``CredentialsError`` whose
``transient`` flag says whether retrying can help:

  * ``sts``          RAM user AccessKey -> STS AssumeRole (aliyunsdksts)
  * ``broker``       HTTP(S) GET returning AccessKeyId/AccessKeySecret/SecurityToken/Expiration
  * ``ecs-ram-role`` the ECS instance metadata service
  * ``env``          OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET / OSS_SESSION_TOKEN
  * ``static``       keys from the config file

``RotatingCredentials`` caches the current snapshot, refreshes it at
``refresh_fraction`` of its lifetime (``tick(now)`` + a thin thread loop), keeps
the old snapshot after a failed refresh until it expires, retries with
exponential backoff and jitter, and deduplicates concurrent refreshes (single
flight).  store.py wraps it in an ``oss2.CredentialsProvider``.

This is the only module that imports aliyunsdkcore / aliyunsdksts, and it does
not import oss2.

Secrets (AccessKeySecret, SecurityToken, the RAM user's secret, the broker's
bearer token and header values) never appear in log events, exception messages,
reprs or ``status()``: every message built here goes through the source's
``_scrub`` and never includes raw server bodies.
"""

from __future__ import annotations

import calendar
import json
import logging
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Protocol, runtime_checkable
from urllib.parse import urlsplit

import requests
import structlog

from . import policy as _policy
from .errors import OssyncdError

log = structlog.get_logger(__name__)

__all__ = [
    "CredentialsError",
    "Snapshot",
    "Source",
    "StsSource",
    "BrokerSource",
    "EcsRamRoleSource",
    "EnvSource",
    "StaticSource",
    "build_source",
    "RotatingCredentials",
    "parse_expiration",
]

DEFAULT_ECS_METADATA_URL = "http://100.100.100.200/latest/meta-data/ram/security-credentials/"
REDACTED = "<redacted>"


# --------------------------------------------------------------------------- errors


class CredentialsError(OssyncdError):
    """Credentials could not be obtained.

    ``transient``: retrying later may succeed (network, 5xx, throttling).
    Permanent errors need an operator (wrong key, missing role, bad config).
    ``source``: the source name; ``code``: the server/SDK error code, if any.
    The message names the source/field and what to do, and never holds a secret.
    """

    label = "credentials error"

    def __init__(self, message: str, *, transient: bool = False, source: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message = message
        self.transient = bool(transient)
        self.source = source
        self.code = code

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (f"CredentialsError({self.message!r}, transient={self.transient!r}, "
                f"source={self.source!r}, code={self.code!r})")

    def copy(self) -> "CredentialsError":
        return CredentialsError(self.message, transient=self.transient, source=self.source,
                                code=self.code)


# --------------------------------------------------------------------------- snapshot


def mask_key_id(key_id: str | None) -> str:
    """Enough of an AccessKeyId to tell keys apart in logs, not the whole id."""
    if not key_id:
        return ""
    if len(key_id) <= 8:
        return key_id[:2] + "***"
    return key_id[:6] + "***" + key_id[-3:]


def iso8601(ts: float | None) -> str | None:
    if ts is None or math.isinf(ts):
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, repr=False)
class Snapshot:
    """One immutable set of credentials. ``expires_at`` is epoch seconds; None = never expires."""

    access_key_id: str
    access_key_secret: str
    security_token: str | None
    expires_at: float | None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def __repr__(self) -> str:
        token = REDACTED if self.security_token else None
        return (f"Snapshot(access_key_id={mask_key_id(self.access_key_id)!r}, "
                f"access_key_secret={REDACTED!r}, security_token={token!r}, "
                f"expires_at={iso8601(self.expires_at)!r})")

    __str__ = __repr__


def parse_expiration(value: Any) -> float:
    """Expiration -> epoch seconds.

    Accepts ISO-8601 (``2015-04-09T11:52:19Z``, offsets, fractional seconds;
    no zone = UTC as STS means it), epoch seconds (int/float/numeric string) and
    epoch milliseconds (values > 1e11).  Raises ValueError.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"unsupported Expiration {value!r}")
    if isinstance(value, (int, float)):
        ts = float(value)
    else:
        s = str(value).strip()
        if re.fullmatch(r"\d+(\.\d+)?", s):
            ts = float(s)
        else:
            m = re.fullmatch(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:?\d{2})?", s)
            if not m:
                raise ValueError(f"unsupported Expiration format {s!r}")
            date, hms, frac, tz = m.groups()
            base = calendar.timegm(time.strptime(f"{date}T{hms}", "%Y-%m-%dT%H:%M:%S"))
            ts = base + (float(frac) if frac else 0.0)
            if tz and tz not in ("Z", "z"):
                sign = 1 if tz[0] == "+" else -1
                digits = tz[1:].replace(":", "")
                ts -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
            return ts
    if ts > 1e11:  # milliseconds
        ts /= 1000.0
    if not math.isfinite(ts) or ts <= 0:
        raise ValueError(f"unsupported Expiration {value!r}")
    return ts


# --------------------------------------------------------------------------- sources


@runtime_checkable
class Source(Protocol):
    name: str

    def fetch(self) -> Snapshot: ...


class _SourceBase:
    name = "?"

    def _secrets(self) -> Iterable[str]:
        return ()

    def _scrub(self, text: str) -> str:
        """One line, bounded, with every known secret value removed."""
        text = " ".join(str(text).split())
        for s in self._secrets():
            if s and len(s) >= 4:
                text = text.replace(s, REDACTED)
        if len(text) > 300:
            text = text[:297] + "..."
        return text

    def _err(self, message: str, *, transient: bool, code: str | None = None) -> CredentialsError:
        return CredentialsError(self._scrub(message), transient=transient, source=self.name, code=code)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def _net_reason(exc: BaseException, timeout: float) -> str:
    """A short, secret-free description of a network failure (no URLs: they carry query strings)."""
    text = str(exc)
    low = text.lower()
    if isinstance(exc, requests.exceptions.Timeout) or "timed out" in low or "timeout" in low:
        return f"timed out after {timeout:g}s"
    if "connection refused" in low or "errno 111" in low:
        return "connection refused"
    if ("name or service not known" in low or "nodename nor servname" in low
            or "getaddrinfo" in low or "temporary failure in name resolution" in low
            or "failed to resolve" in low):
        return "DNS lookup failed"
    if "ssl" in low or "certificate" in low:
        return "TLS handshake failed"
    if "connection reset" in low or "remotedisconnected" in low or "connection aborted" in low:
        return "connection reset"
    if "no route to host" in low or "network is unreachable" in low:
        return "no route to host"
    return f"network error ({type(exc).__name__})"


def _find_credentials_dict(obj: Any, depth: int = 0) -> dict | None:
    """The dict holding AccessKeyId: top level, or under wrapper keys (result/data/credentials/...)."""
    if not isinstance(obj, dict):
        return None
    if _ci_get(obj, "AccessKeyId") is not None:
        return obj
    if depth >= 3:
        return None
    for key in ("result", "data", "credentials", "Credentials", "Result", "Data", "credential"):
        found = _find_credentials_dict(obj.get(key), depth + 1)
        if found is not None:
            return found
    candidates = [f for f in (_find_credentials_dict(v, depth + 1) for v in obj.values()
                              if isinstance(v, dict)) if f is not None]
    return candidates[0] if len(candidates) == 1 else None


def _ci_get(d: dict, key: str) -> Any:
    if key in d:
        return d[key]
    low = key.lower()
    for k, v in d.items():
        if isinstance(k, str) and k.lower() == low:
            return v
    return None


def _snapshot_from_doc(doc: dict, *, need_token: bool = True) -> Snapshot:
    """Build a Snapshot from AccessKeyId/AccessKeySecret/SecurityToken/Expiration. ValueError names missing keys."""
    ak = _ci_get(doc, "AccessKeyId")
    sk = _ci_get(doc, "AccessKeySecret")
    token = _ci_get(doc, "SecurityToken")
    exp = _ci_get(doc, "Expiration")
    missing = [n for n, v in (("AccessKeyId", ak), ("AccessKeySecret", sk)) if not v or not isinstance(v, str)]
    if need_token and (not token or not isinstance(token, str)):
        missing.append("SecurityToken")
    if exp in (None, ""):
        missing.append("Expiration")
    if missing:
        raise ValueError("missing or empty " + ", ".join(missing))
    try:
        expires_at = parse_expiration(exp)
    except ValueError:
        raise ValueError("Expiration is not ISO-8601 or epoch seconds") from None
    return Snapshot(ak, sk, token or None, expires_at)


# --- sts ------------------------------------------------------------------------------


# aliyunsdkcore logs every response body at DEBUG, which for AssumeRole holds the
# new AccessKeySecret and SecurityToken.  Drop those records whatever logging config
# the daemon or a test installs.
class _DropSdkResponseBodies(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        return not msg.startswith("Response received")


_sdk_filter_installed = False


def _install_sdk_log_filter() -> None:
    global _sdk_filter_installed
    if not _sdk_filter_installed:
        logging.getLogger("aliyunsdkcore.client").addFilter(_DropSdkResponseBodies())
        _sdk_filter_installed = True


_STS_TRANSIENT_CODES = {
    "ServiceUnavailable", "InternalError", "InternalFailure", "ServiceBusy", "RequestTimeout",
    "Throttling", "Throttling.User", "Throttling.Api", "Throttling.Api.Dynamic",
    "SDK.UnknownServerError",
}

_PARAM_KEYS = {
    "RoleArn": "credentials.role_arn",
    "RoleSessionName": "credentials.session_name",
    "DurationSeconds": "credentials.duration_seconds",
    "Policy": "credentials.policy (or the policy generated by credentials.scope_policy_to_prefixes)",
    "PolicyGrammar": "credentials.policy (or the policy generated by credentials.scope_policy_to_prefixes)",
}


class StsSource(_SourceBase):
    """AssumeRole with a RAM user's AccessKey. One attempt per fetch(); no SDK retries."""

    name = "sts"

    def __init__(self, *, access_key_id: str, access_key_secret: str, role_arn: str,
                 session_name: str = "ossyncd", duration_seconds: int = 3600,
                 endpoint: str = "https://sts.cn-hangzhou.aliyuncs.com", region: str = "cn-hangzhou",
                 policy: str | None = None, timeout: float = 10.0):
        from aliyunsdkcore.client import AcsClient  # the only aliyunsdkcore importer

        if not access_key_id:
            raise CredentialsError(
                "credentials.access_key_id is empty; source 'sts' needs a RAM user's AccessKey: "
                "set credentials.access_key_id or OSSYNCD_ACCESS_KEY_ID", source=self.name)
        if not access_key_secret:
            raise CredentialsError(
                "credentials.access_key_secret is empty; source 'sts' needs a RAM user's AccessKey: "
                "set credentials.access_key_secret or OSSYNCD_ACCESS_KEY_SECRET", source=self.name)
        if not role_arn:
            raise CredentialsError(
                "credentials.role_arn is empty; source 'sts' needs the ARN of the role to assume, "
                "like acs:ram::1234567890123456:role/uploader", source=self.name)
        endpoint = endpoint or f"https://sts.{region or 'cn-hangzhou'}.aliyuncs.com"
        parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CredentialsError(
                f"credentials.sts_endpoint {endpoint!r} is not an http(s) URL; use e.g. "
                "https://sts.cn-hangzhou.aliyuncs.com", source=self.name)
        try:
            parts.port
        except ValueError:
            raise CredentialsError(f"credentials.sts_endpoint {endpoint!r} has an invalid port",
                                   source=self.name) from None
        self._scheme = parts.scheme
        self._hostport = parts.netloc.rsplit("@", 1)[-1]
        self.endpoint = f"{self._scheme}://{self._hostport}"
        self._ak = access_key_id
        self._sk = access_key_secret
        self.role_arn = role_arn
        self.session_name = session_name or "ossyncd"
        self.duration_seconds = int(duration_seconds)
        self.region = region or "cn-hangzhou"
        self.policy = policy or None
        self.timeout = float(timeout or 10.0)
        _install_sdk_log_filter()
        # HttpResponse passes `proxies=` explicitly, which bypasses NO_PROXY; decide here.
        proxies = requests.utils.get_environ_proxies(self.endpoint + "/") or {"http": None, "https": None}
        self._client = AcsClient(self._ak, self._sk, self.region, auto_retry=False,
                                 connect_timeout=self.timeout, timeout=self.timeout, proxy=proxies)

    def _secrets(self):
        return (self._sk,)

    def _request(self):
        from aliyunsdksts.request.v20150401.AssumeRoleRequest import AssumeRoleRequest

        req = AssumeRoleRequest()
        req.set_endpoint(self._hostport)
        req.set_protocol_type(self._scheme)  # AssumeRoleRequest forces https otherwise
        req.set_RoleArn(self.role_arn)
        req.set_RoleSessionName(self.session_name)
        req.set_DurationSeconds(self.duration_seconds)
        if self.policy:
            req.set_Policy(self.policy)
        return req

    def fetch(self) -> Snapshot:
        from aliyunsdkcore.acs_exception.exceptions import ClientException, ServerException

        where = f"AssumeRole on {self.endpoint} failed"
        try:
            body = self._client.do_action_with_exception(self._request())
        except ServerException as e:
            raise self._map_server_error(e) from None
        except ClientException as e:
            code = e.get_error_code()
            if code == "SDK.HttpError":
                raise self._err(
                    f"STS endpoint {self.endpoint} unreachable: {_net_reason(e, self.timeout)}; "
                    "check credentials.sts_endpoint and the network (will retry)",
                    transient=True, code=code) from None
            raise self._err(f"{where}: {code}: {e.get_error_msg()}", transient=False, code=code) from None
        except IndexError:
            # aliyunsdkcore splits a SignatureDoesNotMatch message on ':' and crashes when there is none.
            raise self._err(
                f"{where}: SignatureDoesNotMatch: the request signature was rejected, usually a wrong "
                "AccessKey secret; check credentials.access_key_secret or OSSYNCD_ACCESS_KEY_SECRET",
                transient=False, code="SignatureDoesNotMatch") from None
        except requests.exceptions.RequestException as e:  # pragma: no cover - SDK wraps these
            raise self._err(f"STS endpoint {self.endpoint} unreachable: {_net_reason(e, self.timeout)}",
                            transient=True, code="SDK.HttpError") from None
        try:
            doc = json.loads(body)
            snap = _snapshot_from_doc(doc["Credentials"])
        except (ValueError, KeyError, TypeError) as e:
            detail = str(e) if isinstance(e, ValueError) and "missing" in str(e) else "no Credentials object"
            raise self._err(f"{where}: the response is not an AssumeRole result ({detail}); "
                            "check credentials.sts_endpoint", transient=True, code="BadResponse") from None
        return snap

    def _map_server_error(self, e) -> CredentialsError:
        code = str(e.get_error_code() or "")
        status = e.get_http_status()
        msg = self._scrub(e.get_error_msg() or "")
        where = f"AssumeRole on {self.endpoint} failed"
        key_id = mask_key_id(self._ak)

        def perm(text: str) -> CredentialsError:
            return self._err(f"{where}: {code}: {text}", transient=False, code=code)

        if code == "InvalidAccessKeyId.Inactive":
            return perm(f"the AccessKey {key_id} is disabled; enable it in RAM or configure "
                        "another key in credentials.access_key_id / OSSYNCD_ACCESS_KEY_ID")
        if code.startswith("InvalidAccessKeyId"):
            return perm(f"the AccessKey ID {key_id} is not known to STS; check "
                        "credentials.access_key_id or OSSYNCD_ACCESS_KEY_ID")
        if code in ("InvalidAccessKeySecret", "SignatureDoesNotMatch", "IncompleteSignature"):
            return perm("the AccessKey secret is wrong; check credentials.access_key_secret or "
                        "OSSYNCD_ACCESS_KEY_SECRET")
        if code.startswith("InvalidTimeStamp") or code == "RequestTimeTooSkewed":
            return perm("the local clock is too far off; synchronise the system time (NTP)")
        if code.startswith("EntityNotExist"):
            return perm(f"the role {self.role_arn} does not exist; check credentials.role_arn")
        if code.startswith("NoPermission") or code.startswith("AccessDenied") or code == "Forbidden":
            return perm(f"the RAM user {key_id} may not assume {self.role_arn} ({msg}); allow "
                        "sts:AssumeRole on it for the user and trust the user's account in the "
                        "role's trust policy, or fix credentials.role_arn")
        if code in ("MissingSecurityToken",) or code.startswith("InvalidSecurityToken"):
            return perm("credentials.access_key_id is an STS key; AssumeRole needs a RAM user's "
                        "long-term AccessKey")
        if code.startswith("InvalidParameter") or code.startswith("MissingParameter") or \
                code.startswith("InvalidRoleArn") or code.startswith("MissingRole"):
            suffix = code.split(".", 1)[1] if "." in code else ""
            key = _PARAM_KEYS.get(suffix)
            if key is None and code.startswith("InvalidRoleArn"):
                key = _PARAM_KEYS["RoleArn"]
            if suffix == "RoleSessionName":
                return perm(f"credentials.session_name {self.session_name!r} is invalid ({msg}); "
                            "use 2-64 characters from A-Z a-z 0-9 . @ _ -")
            if suffix == "DurationSeconds":
                return perm(f"credentials.duration_seconds {self.duration_seconds} is out of range "
                            f"({msg}); use 900 up to the role's MaxSessionDuration (3600 by default)")
            if key:
                return perm(f"{key} is invalid: {msg}")
            return perm(f"invalid parameter ({msg}); check the [credentials] section")
        if (status is not None and status >= 500) or code in _STS_TRANSIENT_CODES or code.startswith("Throttling"):
            what = "throttled" if code.startswith("Throttling") else "temporarily unavailable"
            return self._err(f"{where}: {code or 'HTTP ' + str(status)}: STS is {what} "
                             f"(HTTP {status}); will retry", transient=True, code=code)
        return perm(f"HTTP {status}: {msg}")


# --- broker ---------------------------------------------------------------------------


def _status_text(r: requests.Response) -> str:
    return f"HTTP {r.status_code} {r.reason}" if r.reason else f"HTTP {r.status_code}"


class _HttpJsonSource(_SourceBase):
    timeout = 10.0

    def __init__(self):
        self._session = requests.Session()

    def _get(self, url: str, what: str, headers: dict | None = None) -> requests.Response:
        try:
            return self._session.get(url, headers=headers or {}, timeout=(self.timeout, self.timeout),
                                     allow_redirects=True)
        except requests.exceptions.RequestException as e:
            raise self._err(f"{what} {url} unreachable: {_net_reason(e, self.timeout)}; {self._unreachable_hint}",
                            transient=True, code="Unreachable") from None

    _unreachable_hint = "will retry"

    def _json(self, r: requests.Response, where: str, hint: str, *, transient: bool):
        try:
            return r.json()
        except ValueError:
            ctype = r.headers.get("Content-Type", "?")
            raise self._err(f"{where} did not return JSON (Content-Type {ctype}); {hint}",
                            transient=transient, code="BadResponse") from None

    def _snapshot(self, doc: dict, where: str, *, transient: bool) -> Snapshot:
        try:
            return _snapshot_from_doc(doc)
        except ValueError as e:
            raise self._err(f"{where} returned unusable credentials: {e}", transient=transient,
                            code="BadResponse") from None


class BrokerSource(_HttpJsonSource):
    """GET a credentials broker (the upload-with-STS pattern)."""

    name = "broker"
    _unreachable_hint = "check credentials.broker_url and the network (will retry)"

    def __init__(self, *, url: str, token: str = "", headers: dict[str, str] | None = None,
                 timeout: float = 10.0):
        super().__init__()
        parts = urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CredentialsError(
                f"credentials.broker_url {url!r} is not an http(s) URL; source 'broker' needs the "
                "URL that returns AccessKeyId/AccessKeySecret/SecurityToken/Expiration", source=self.name)
        self.url = url
        self._token = token or ""
        self._headers = dict(headers or {})
        self.timeout = float(timeout or 10.0)

    def _secrets(self):
        return (self._token, *self._headers.values())

    def fetch(self) -> Snapshot:
        headers = {"Accept": "application/json", **self._headers}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        r = self._get(self.url, "credentials broker", headers)
        status = r.status_code
        if status == 429 or status >= 500:
            raise self._err(f"credentials broker {self.url} answered {_status_text(r)}; will retry",
                            transient=True, code=f"HTTP{status}")
        if status in (401, 403):
            hint = ("check credentials.broker_token" if self._token
                    else "set credentials.broker_token (sent as 'Authorization: Bearer ...')")
            raise self._err(f"credentials broker {self.url} answered {_status_text(r)}: "
                            f"not authorised; {hint} or credentials.broker_headers",
                            transient=False, code=f"HTTP{status}")
        if status >= 300:
            raise self._err(f"credentials broker {self.url} answered {_status_text(r)}; "
                            "check credentials.broker_url", transient=False, code=f"HTTP{status}")
        doc = self._json(r, f"credentials broker {self.url}", "check credentials.broker_url", transient=False)
        creds = _find_credentials_dict(doc)
        if creds is None:
            keys = sorted(str(k) for k in doc)[:10] if isinstance(doc, dict) else type(doc).__name__
            raise self._err(f"credentials broker {self.url} returned JSON without AccessKeyId (top-level "
                            f"keys: {keys}); it must hold AccessKeyId, AccessKeySecret, SecurityToken and "
                            "Expiration at the top level or under one wrapper key such as 'result'",
                            transient=False, code="BadResponse")
        return self._snapshot(creds, f"credentials broker {self.url}", transient=False)


# --- ecs-ram-role ---------------------------------------------------------------------


class EcsRamRoleSource(_HttpJsonSource):
    """The ECS instance metadata service (normal mode, with a fallback to token/hardened mode)."""

    name = "ecs-ram-role"
    _unreachable_hint = ("is this an ECS instance with a RAM role? check credentials.ecs_metadata_url "
                         "(will retry)")

    def __init__(self, *, role_name: str = "", metadata_url: str = DEFAULT_ECS_METADATA_URL,
                 timeout: float = 10.0):
        super().__init__()
        metadata_url = metadata_url or DEFAULT_ECS_METADATA_URL
        parts = urlsplit(metadata_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CredentialsError(f"credentials.ecs_metadata_url {metadata_url!r} is not an http(s) URL",
                                   source=self.name)
        if not metadata_url.endswith("/"):
            metadata_url += "/"
        self.metadata_url = metadata_url
        self.role_name = (role_name or "").strip("/")
        self.timeout = float(timeout or 10.0)
        self._token_url = f"{parts.scheme}://{parts.netloc}/latest/api/token"
        self._imds_token: str | None = None

    def _secrets(self):
        return (self._imds_token or "",)

    def _imds_get(self, url: str) -> requests.Response:
        headers = {"X-aliyun-ecs-metadata-token": self._imds_token} if self._imds_token else {}
        r = self._get(url, "instance metadata service", headers)
        if r.status_code in (401, 403):  # hardened mode: get a session token and retry once
            try:
                t = self._session.put(self._token_url, timeout=(self.timeout, self.timeout),
                                      headers={"X-aliyun-ecs-metadata-token-ttl-seconds": "21600"})
            except requests.exceptions.RequestException:
                return r
            if t.status_code == 200 and t.text.strip():
                self._imds_token = t.text.strip()
                r = self._get(url, "instance metadata service",
                              {"X-aliyun-ecs-metadata-token": self._imds_token})
        return r

    def _check(self, r: requests.Response, url: str, what: str) -> None:
        status = r.status_code
        if status == 429 or status >= 500:
            raise self._err(f"instance metadata service {url} answered HTTP {status} {what}; will retry",
                            transient=True, code=f"HTTP{status}")
        if status == 404:
            hint = ("no RAM role is attached to this instance; attach one in the ECS console"
                    if url == self.metadata_url else
                    f"role {self.role_name!r} is not attached to this instance; check credentials.ecs_role_name")
            raise self._err(f"instance metadata service {url} answered HTTP 404 {what}: {hint}",
                            transient=False, code="HTTP404")
        if status >= 300:
            raise self._err(f"instance metadata service {url} answered HTTP {status} {what}; check "
                            "credentials.ecs_metadata_url", transient=False, code=f"HTTP{status}")

    def _discover_role(self) -> str:
        r = self._imds_get(self.metadata_url)
        self._check(r, self.metadata_url, "listing roles")
        names = [line.strip().strip("/") for line in r.text.splitlines() if line.strip()]
        if not names:
            raise self._err(f"instance metadata service {self.metadata_url} lists no RAM role: attach "
                            "one to the instance or set credentials.ecs_role_name", transient=False,
                            code="NoRole")
        if len(names) > 1:
            log.warning("credentials.ecs_multiple_roles", roles=names, using=names[0])
        return names[0]

    def fetch(self) -> Snapshot:
        role = self.role_name or self._discover_role()
        url = self.metadata_url + role
        r = self._imds_get(url)
        self._check(r, url, "for the role document")
        doc = self._json(r, f"instance metadata service {url}", "check credentials.ecs_metadata_url",
                         transient=True)
        if not isinstance(doc, dict):
            raise self._err(f"instance metadata service {url} returned unexpected JSON",
                            transient=True, code="BadResponse")
        code = doc.get("Code")
        if code is not None and code != "Success":
            raise self._err(f"instance metadata service {url} returned Code={code!r} for role {role!r}; "
                            "will retry", transient=True, code=str(code))
        return self._snapshot(doc, f"instance metadata service {url}", transient=True)


# --- env / static ---------------------------------------------------------------------


class EnvSource(_SourceBase):
    """OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET / OSS_SESSION_TOKEN, read at fetch time."""

    name = "env"
    ID_VAR, SECRET_VAR, TOKEN_VAR = "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN"

    def __init__(self, environ: dict | None = None):
        self._environ = os.environ if environ is None else environ

    def _secrets(self):
        return (self._environ.get(self.SECRET_VAR, ""), self._environ.get(self.TOKEN_VAR, ""))

    def fetch(self) -> Snapshot:
        ak = self._environ.get(self.ID_VAR, "").strip()
        sk = self._environ.get(self.SECRET_VAR, "").strip()
        token = self._environ.get(self.TOKEN_VAR, "").strip()
        missing = [n for n, v in ((self.ID_VAR, ak), (self.SECRET_VAR, sk)) if not v]
        if missing:
            raise self._err(f"credentials.source = 'env' but {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not set in the daemon's environment; "
                            f"export {self.ID_VAR} and {self.SECRET_VAR} (and {self.TOKEN_VAR} for an STS token)",
                            transient=False, code="MissingEnv")
        return Snapshot(ak, sk, token or None, None)


class StaticSource(_SourceBase):
    """Keys from the config file; never expire."""

    name = "static"

    def __init__(self, *, access_key_id: str, access_key_secret: str, security_token: str = ""):
        missing = []
        if not access_key_id:
            missing.append("credentials.access_key_id (or OSSYNCD_ACCESS_KEY_ID)")
        if not access_key_secret:
            missing.append("credentials.access_key_secret (or OSSYNCD_ACCESS_KEY_SECRET)")
        if missing:
            raise CredentialsError(f"credentials.source = 'static' needs {' and '.join(missing)}",
                                   source=self.name)
        self._snap = Snapshot(access_key_id, access_key_secret, security_token or None, None)

    def fetch(self) -> Snapshot:
        return self._snap


def build_source(cc, *, bucket: str, prefixes: list[str]) -> Source:
    """The Source for ``cc.source``. Raises a permanent CredentialsError naming the config key."""
    kind = (getattr(cc, "source", "") or "").strip()
    timeout = float(getattr(cc, "timeout_seconds", 10.0) or 10.0)
    if kind == "sts":
        inline = (getattr(cc, "policy", "") or "").strip()
        if inline and getattr(cc, "scope_policy_to_prefixes", False):
            raise CredentialsError(
                "credentials.policy and credentials.scope_policy_to_prefixes are both set; use one: "
                "either your own inline policy or the one generated for the watch prefixes", source="sts")
        if inline:
            try:
                inline = json.dumps(json.loads(inline), separators=(",", ":"))
            except ValueError as e:
                raise CredentialsError(f"credentials.policy is not valid JSON: {e}", source="sts") from None
            if len(inline) > _policy.MAX_INLINE_POLICY_CHARS:
                raise CredentialsError(
                    f"credentials.policy is {len(inline)} characters compacted, over the "
                    f"{_policy.MAX_INLINE_POLICY_CHARS}-character AssumeRole limit", source="sts")
        elif getattr(cc, "scope_policy_to_prefixes", False):
            try:
                inline = _policy.inline_policy_json(bucket, prefixes)
            except _policy.PolicyError as e:
                raise CredentialsError(f"credentials.scope_policy_to_prefixes: {e}", source="sts") from None
        duration = getattr(cc, "duration_seconds", 3600)
        try:
            duration = int(duration)
            if duration <= 0:
                raise ValueError
        except (TypeError, ValueError):
            raise CredentialsError(f"credentials.duration_seconds {duration!r} must be a positive integer "
                                   "(900..43200 on Alibaba Cloud)", source="sts") from None
        return StsSource(
            access_key_id=getattr(cc, "access_key_id", "") or "",
            access_key_secret=getattr(cc, "access_key_secret", "") or "",
            role_arn=getattr(cc, "role_arn", "") or "",
            session_name=getattr(cc, "session_name", "") or "ossyncd",
            duration_seconds=duration,
            endpoint=getattr(cc, "sts_endpoint", "") or "",
            region=getattr(cc, "sts_region", "") or "cn-hangzhou",
            policy=inline or None,
            timeout=timeout,
        )
    if kind == "broker":
        return BrokerSource(url=getattr(cc, "broker_url", "") or "",
                            token=getattr(cc, "broker_token", "") or "",
                            headers=dict(getattr(cc, "broker_headers", None) or {}),
                            timeout=timeout)
    if kind == "ecs-ram-role":
        return EcsRamRoleSource(role_name=getattr(cc, "ecs_role_name", "") or "",
                                metadata_url=getattr(cc, "ecs_metadata_url", "") or DEFAULT_ECS_METADATA_URL,
                                timeout=timeout)
    if kind == "env":
        return EnvSource()
    if kind == "static":
        return StaticSource(access_key_id=getattr(cc, "access_key_id", "") or "",
                            access_key_secret=getattr(cc, "access_key_secret", "") or "",
                            security_token=getattr(cc, "security_token", "") or "")
    raise CredentialsError(f"credentials.source {kind!r} is not one of sts, broker, ecs-ram-role, env, static")


# --------------------------------------------------------------------------- rotation


class RotatingCredentials:
    """The current credentials, refreshed ahead of expiry.

    * ``current()`` is lock-free while the cached snapshot is usable; otherwise it
      refreshes synchronously (single flight).  While a failed refresh is in its
      backoff window it raises the last error at once instead of hammering the source.
    * ``tick(now)`` refreshes when due: at ``refresh_fraction`` of the lifetime
      (measured from the start of the fetch), or at the retry time after a failure.
      A failed refresh keeps the old snapshot until it expires.  Backoff after the
      n-th consecutive failure is ``min(max_backoff, min_backoff * 2**(n-1))`` scaled by
      a jitter factor in [0.5, 1.0]; permanent errors back off at the cap straight away.
    * ``force_refresh(stale)``: OSS rejected ``stale``.  If the current snapshot is
      already a different, usable one it is returned with no fetch, so many parts
      failing together cause one refresh.
    """

    def __init__(self, source: Source, *, clock: Callable[[], float] = time.time,
                 refresh_fraction: float = 0.8, min_backoff: float = 1.0, max_backoff: float = 60.0,
                 rng: Callable[[], float] = random.random):
        if not 0.0 < refresh_fraction <= 1.0:
            raise ValueError("refresh_fraction must be in (0, 1]")
        self._source = source
        self._clock = clock
        self._fraction = float(refresh_fraction)
        self._min_backoff = float(min_backoff)
        self._max_backoff = max(float(max_backoff), float(min_backoff))
        self._rng = rng
        self._cond = threading.Condition(threading.Lock())
        self._snap: Snapshot | None = None
        self._rejected: Snapshot | None = None   # the snapshot OSS refused (force_refresh)
        self._fetched_at: float | None = None
        self._last_refresh_at: float | None = None
        self._next_attempt: float = -math.inf     # due immediately: no snapshot yet
        self._failures = 0
        self._last_error: CredentialsError | None = None
        self._last_attempt_failed = False
        self._seq = 0                              # completed attempts
        self._refreshing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # called after every fetch, so a published status() is never older than the credentials
        # in use (the daemon writes it to the state DB for `ossyncd status`)
        self.on_change: Callable[[], None] | None = None

    @property
    def source_name(self) -> str:
        return self._source.name

    def __repr__(self) -> str:
        return f"<RotatingCredentials source={self._source.name!r} current={self._snap!r}>"

    # -- state helpers (call with the lock held, or accept a racy read) -----------------

    def _usable(self, snap: Snapshot | None, now: float) -> bool:
        return snap is not None and not snap.expired(now) and not (
            self._rejected is not None and snap == self._rejected)

    def _backoff(self, err: CredentialsError) -> float:
        if not err.transient:
            base = self._max_backoff
        else:
            base = min(self._max_backoff, self._min_backoff * 2 ** min(self._failures - 1, 62))
        return base * (0.5 + 0.5 * self._rng())

    def _raise_last(self):
        err = self._last_error
        if err is None:  # pragma: no cover - defensive
            raise CredentialsError(f"{self._source.name} credentials are not available", transient=True,
                                   source=self._source.name)
        raise err.copy()

    # -- the one place that fetches ------------------------------------------------------

    def _attempt(self, started: float) -> tuple[Snapshot | None, CredentialsError | None]:
        """Fetch once (caller has set ``_refreshing``), record the outcome, wake waiters."""
        name = self._source.name
        snap: Snapshot | None = None
        err: CredentialsError | None = None
        try:
            snap = self._source.fetch()
            if not isinstance(snap, Snapshot):
                raise CredentialsError(f"{name} source returned {type(snap).__name__}, not a Snapshot",
                                       transient=True, source=name)
            end = self._clock()
            if snap.expires_at is not None and snap.expires_at <= end:
                raise CredentialsError(
                    f"{name} returned credentials that expired at {iso8601(snap.expires_at)}, before the "
                    f"local time {iso8601(end)}; check the system clock (NTP)", transient=True, source=name,
                    code="ExpiredOnArrival")
        except CredentialsError as e:
            err, snap = e, None
        except Exception as e:  # a bug or an SDK surprise: never leak its text, keep the daemon alive
            err, snap = CredentialsError(f"{name} credentials fetch failed unexpectedly: "
                                         f"{type(e).__name__}", transient=True, source=name), None
        with self._cond:
            self._seq += 1
            self._refreshing = False
            now = self._clock()
            if err is None:
                self._snap = snap
                self._rejected = None
                self._fetched_at = started
                self._last_refresh_at = now
                self._failures = 0
                self._last_error = None
                self._last_attempt_failed = False
                if snap.expires_at is None:
                    self._next_attempt = math.inf
                else:
                    self._next_attempt = started + self._fraction * (snap.expires_at - started)
            else:
                self._failures += 1
                self._last_error = err
                self._last_attempt_failed = True
                self._next_attempt = max(now, started) + self._backoff(err)
            failures, next_attempt, current = self._failures, self._next_attempt, self._snap
            self._cond.notify_all()
        if err is None:
            log.info("credentials.refreshed", source=name, access_key_id=mask_key_id(snap.access_key_id),
                     expires_at=iso8601(snap.expires_at), next_refresh_at=iso8601(next_attempt))
        else:
            still_valid = current is not None and not current.expired(now)
            (log.warning if still_valid and err.transient else log.error)(
                "credentials.refresh_failed", source=name, error=str(err), transient=err.transient,
                consecutive_failures=failures, retry_at=iso8601(next_attempt),
                current_valid_until=iso8601(current.expires_at) if still_valid else None)
        self._announce()
        return snap, err

    def _announce(self) -> None:
        callback = self.on_change
        if callback is None:
            return
        try:
            callback()
        except Exception as e:  # e.g. the state DB is busy: the next publish catches up
            log.error("credentials.status_not_published", source=self._source.name, error=repr(e))

    def _single_flight(self, satisfied: Callable[[Snapshot | None, float, int], bool]) -> Snapshot:
        with self._cond:
            seq0 = self._seq
            while True:
                now = self._clock()
                if satisfied(self._snap, now, seq0):
                    return self._snap
                if self._refreshing:
                    self._cond.wait(timeout=1.0)
                    continue
                if self._seq > seq0 and self._last_attempt_failed:
                    self._raise_last()          # the refresh we waited for failed: share its error
                if self._failures and now < self._next_attempt:
                    self._raise_last()          # in backoff
                self._refreshing = True
                break
        snap, err = self._attempt(now)
        if err is not None:
            raise err.copy()
        return snap

    # -- public API ------------------------------------------------------------------------

    def current(self) -> Snapshot:
        snap = self._snap
        if self._usable(snap, self._clock()):
            return snap
        return self._single_flight(lambda s, now, seq0: self._usable(s, now))

    def force_refresh(self, stale: Snapshot | None = None) -> Snapshot:
        with self._cond:
            if stale is not None and self._snap is not None and self._snap == stale:
                if self._rejected != stale:
                    log.info("credentials.rejected_by_server", source=self._source.name,
                             access_key_id=mask_key_id(stale.access_key_id))
                self._rejected = stale

        def satisfied(s, now, seq0):
            if stale is not None:
                return self._usable(s, now) and s != stale
            return self._seq > seq0 and not self._last_attempt_failed and self._usable(s, now)

        return self._single_flight(satisfied)

    def tick(self, now: float) -> float:
        with self._cond:
            if self._refreshing:
                return now + 0.05
            if now < self._next_attempt:
                return self._next_attempt
            self._refreshing = True
        self._attempt(now)
        with self._cond:
            return self._next_attempt

    def retry_at(self) -> float | None:
        """After a failed fetch, when the next one is due (epoch seconds); None when healthy.
        Work waiting for credentials should come back then, not sooner (it would fail at once)."""
        with self._cond:
            if self._failures and math.isfinite(self._next_attempt):
                return self._next_attempt
            return None

    def status(self) -> dict:
        with self._cond:
            now = self._clock()
            snap = self._snap
            return {
                "source": self._source.name,
                "expires_at": iso8601(snap.expires_at) if snap else None,
                "last_refresh_at": iso8601(self._last_refresh_at),
                "last_error": str(self._last_error) if self._last_error else None,
                "next_attempt_at": iso8601(self._next_attempt if self._next_attempt > -math.inf else now),
                "healthy": self._usable(snap, now),
                "consecutive_failures": self._failures,
            }

    # -- thread loop -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"ossyncd-credentials-{self._source.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                nxt = self.tick(self._clock())
            except Exception as e:  # pragma: no cover - tick records fetch errors itself
                log.error("credentials.tick_crashed", source=self._source.name, error=type(e).__name__)
                nxt = self._clock() + self._min_backoff
            # cap the sleep so a suspended host or a stepped clock is noticed soon
            delay = min(max(nxt - self._clock(), 0.01), 30.0)
            self._stop.wait(delay)
