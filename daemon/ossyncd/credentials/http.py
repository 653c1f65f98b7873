"""The HTTP JSON sources: ``broker`` (a credentials broker URL) and ``ecs-ram-role`` (the ECS
instance metadata service). Both GET a JSON document holding AccessKeyId / AccessKeySecret /
SecurityToken / Expiration; ``HttpJsonSource`` holds what they share."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import requests
import structlog

from ossyncd.errors import CredentialsError

from .base import Snapshot, SourceBase, ci_get, net_reason, snapshot_from_doc

log = structlog.get_logger("ossyncd.credentials")


def _find_credentials_dict(obj: Any, depth: int = 0) -> dict | None:
    """The dict holding AccessKeyId: top level, or under wrapper keys (result/data/credentials/...)."""
    if not isinstance(obj, dict):
        return None
    if ci_get(obj, "AccessKeyId") is not None:
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



def _status_text(r: requests.Response) -> str:
    return f"HTTP {r.status_code} {r.reason}" if r.reason else f"HTTP {r.status_code}"


class HttpJsonSource(SourceBase):
    """GET a JSON credentials document: one session, one timeout, the same error wording."""

    _unreachable_hint = "will retry"

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._session = requests.Session()

    def _get(self, url: str, what: str, headers: dict | None = None) -> requests.Response:
        try:
            return self._session.get(url, headers=headers or {}, timeout=(self.timeout, self.timeout),
                                     allow_redirects=True)
        except requests.exceptions.RequestException as e:
            raise self._err(f"{what} {url} unreachable: {net_reason(e, self.timeout)}; {self._unreachable_hint}",
                            transient=True, code="Unreachable") from None

    def _json(self, r: requests.Response, where: str, hint: str, *, transient: bool):
        try:
            return r.json()
        except ValueError:
            ctype = r.headers.get("Content-Type", "?")
            raise self._err(f"{where} did not return JSON (Content-Type {ctype}); {hint}",
                            transient=transient, code="BadResponse") from None

    def _snapshot(self, doc: dict, where: str, *, transient: bool) -> Snapshot:
        try:
            return snapshot_from_doc(doc)
        except ValueError as e:
            raise self._err(f"{where} returned unusable credentials: {e}", transient=transient,
                            code="BadResponse") from None


@dataclass(frozen=True)
class Registration:
    """What a broker's answer says about this host's registration (docs/broker.md): the bucket
    and where it is, and the key prefixes its tokens may write. "" / None: the broker did not say."""

    bucket: str = ""
    region: str = ""
    endpoint: str = ""
    prefixes: tuple[str, ...] | None = None


def _registration(doc: dict) -> Registration:
    def text(key: str) -> str:
        v = ci_get(doc, key)
        return v.strip() if isinstance(v, str) else ""
    raw = ci_get(doc, "Prefixes")
    prefixes = tuple(p for p in raw if isinstance(p, str)) if isinstance(raw, list) else None
    return Registration(text("Bucket"), text("Region"), text("Endpoint"), prefixes)


def path_token(url: str) -> str:
    """The token of a broker URL of the form .../v1/credentials/TOKEN (for clients that cannot send
    headers), "" for any other form: a secret like broker_token, kept out of every message."""
    head, sep, tail = urlsplit(url).path.rstrip("/").rpartition("/v1/credentials/")
    return tail if sep and "/" not in tail else ""


def _retry_after(value: str | None) -> float | None:
    """HTTP Retry-After: delay-seconds or an HTTP-date; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), 3600.0) if math.isfinite(seconds) else None


def _error_body(r: requests.Response) -> tuple[str, str, bool]:
    """(Code, Message, Permanent) of a broker's JSON error answer; ("", "", False) without one."""
    try:
        doc = r.json()
    except ValueError:
        return "", "", False
    if not isinstance(doc, dict):
        return "", "", False
    code, message = ci_get(doc, "Code"), ci_get(doc, "Message")
    return (str(code)[:64] if isinstance(code, (str, int)) else "",
            " ".join(str(message).split())[:160] if isinstance(message, str) else "",
            ci_get(doc, "Permanent") is True)


class BrokerSource(HttpJsonSource):
    """GET a credentials broker (the upload-with-STS pattern; ossyncd's own broker answers as
    docs/broker.md says). ``registration`` holds what the last good answer said about this host."""

    name = "broker"
    max_message = 600   # the refusals carry what the operator does
    _unreachable_hint = "check credentials.broker_url and the network (will retry)"

    def __init__(self, *, url: str, token: str = "", headers: dict[str, str] | None = None,
                 timeout: float = 10.0):
        """``url`` is an http(s) URL (config.CredentialsConfig checks credentials.broker_url)."""
        super().__init__(timeout)
        self.url = url
        self._token = token
        self._headers = dict(headers or {})
        self.registration: Registration | None = None

    def _secrets(self):
        return (self._token, *self._headers.values(), path_token(self.url))

    def request_headers(self) -> dict[str, str]:
        """The broker's authentication headers (the heartbeat sends the same)."""
        headers = {"Accept": "application/json", **self._headers}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _refusal(self, r: requests.Response) -> CredentialsError:
        """The error for a non-2xx answer, with the broker's own Code and Message when it sent JSON."""
        status = r.status_code
        code, message, permanent = _error_body(r)
        said = f" ({': '.join(x for x in (code, message) if x)})" if code or message else ""
        where = f"credentials broker {self.url} answered {_status_text(r)}{said}"
        code = code or f"HTTP{status}"
        if status == 429:
            wait = _retry_after(r.headers.get("Retry-After"))
            return self._err(f"{where}; will retry" + (f" after {wait:g} s (Retry-After)" if wait else ""),
                             transient=True, code=code, retry_after=wait)
        if status >= 500 and permanent:
            return self._err(f"{where}: the broker's STS call fails permanently (the uploader role, its trust "
                             "policy or the broker's RAM identity); fix it at the broker - uploads wait and "
                             "resume by themselves", transient=False, code=code)
        if status >= 500:
            return self._err(f"{where}; will retry", transient=True, code=code)
        if status in (401, 403):
            if not self._token:
                hint = ("set credentials.broker_token (sent as 'Authorization: Bearer ...') or "
                        "credentials.broker_headers")
            elif code == "ClientDisabled":
                hint = ("this host's client is disabled at the broker; re-enable it there (see `ossyncd broker "
                        "list-clients`) - uploads wait and resume by themselves")
            else:
                hint = ("this host's client is unknown to the broker (removed, or its token rotated?): run "
                        "`ossyncd broker list-clients` on the broker (`ossyncd broker rotate-token NAME` for a "
                        "new token), then update credentials.broker_token and send SIGHUP; uploads wait")
            return self._err(f"{where}: not authorised; {hint}", transient=False, code=code)
        return self._err(f"{where}; check credentials.broker_url", transient=False, code=code)

    def fetch(self) -> Snapshot:
        """One GET of the broker URL. CredentialsError: transient for network errors, 429 (with
        ``retry_after``) and 5xx; permanent for 4xx, a 5xx saying "Permanent": true, and a document
        without usable credentials. A good answer also updates ``registration``."""
        r = self._get(self.url, "credentials broker", self.request_headers())
        if r.status_code >= 300:
            raise self._refusal(r)
        doc = self._json(r, f"credentials broker {self.url}", "check credentials.broker_url", transient=False)
        creds = _find_credentials_dict(doc)
        if creds is None:
            keys = sorted(str(k) for k in doc)[:10] if isinstance(doc, dict) else type(doc).__name__
            raise self._err(f"credentials broker {self.url} returned JSON without AccessKeyId (top-level "
                            f"keys: {keys}); it must hold AccessKeyId, AccessKeySecret, SecurityToken and "
                            "Expiration at the top level or under one wrapper key such as 'result'",
                            transient=False, code="BadResponse")
        snap = self._snapshot(creds, f"credentials broker {self.url}", transient=False)
        self.registration = _registration(creds)
        return snap


# --- ecs-ram-role ---------------------------------------------------------------------


class EcsRamRoleSource(HttpJsonSource):
    """The ECS instance metadata service (normal mode, with a fallback to token/hardened mode)."""

    name = "ecs-ram-role"
    _unreachable_hint = ("is this an ECS instance with a RAM role? check credentials.ecs_metadata_url "
                         "(will retry)")

    def __init__(self, *, metadata_url: str, role_name: str = "", timeout: float = 10.0,
                 token_first: bool = False):
        """``metadata_url`` is an http(s) URL (config.CredentialsConfig checks
        credentials.ecs_metadata_url and owns its default)."""
        super().__init__(timeout)
        parts = urlsplit(metadata_url)
        if not metadata_url.endswith("/"):
            metadata_url += "/"
        self.metadata_url = metadata_url
        self.role_name = role_name.strip("/")
        self._token_url = f"{parts.scheme}://{parts.netloc}/latest/api/token"
        self._imds_token: str | None = None
        self._token_first = token_first   # IMDSv2: a session token before the first GET
        if token_first:
            # the chain's probe: the link-local service is never behind a proxy, and a proxy
            # answering for it would pass for "no role attached"
            self._session.trust_env = False

    def _put_token(self) -> bool:
        try:
            t = self._session.put(self._token_url, timeout=(self.timeout, self.timeout),
                                  headers={"X-aliyun-ecs-metadata-token-ttl-seconds": "21600"})
        except requests.exceptions.RequestException as e:
            if self._token_first:
                raise self._err(f"instance metadata service {self._token_url} unreachable: "
                                f"{net_reason(e, self.timeout)}; {self._unreachable_hint}",
                                transient=True, code="Unreachable") from None
            return False
        if t.status_code == 200 and t.text.strip():
            self._imds_token = t.text.strip()
            return True
        return False

    def _secrets(self):
        return (self._imds_token or "",)

    def _imds_get(self, url: str) -> requests.Response:
        if self._token_first and not self._imds_token:
            self._put_token()
        headers = {"X-aliyun-ecs-metadata-token": self._imds_token} if self._imds_token else {}
        r = self._get(url, "instance metadata service", headers)
        if r.status_code in (401, 403) and self._put_token():  # hardened mode, or the token expired
            r = self._get(url, "instance metadata service", {"X-aliyun-ecs-metadata-token": self._imds_token})
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
        """The role document (listing the role first when credentials.ecs_role_name is empty).
        CredentialsError: transient for network errors, 429, 5xx and a bad document (the
        service is local and recovers); permanent for 404 (no role attached) and other 4xx."""
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



# --- uri ----------------------------------------------------------------------------------


class UriSource(HttpJsonSource):
    """A credentials URI (ALIBABA_CLOUD_CREDENTIALS_URI / credentials.url) answering, at the top
    level, {"Code": "Success", "AccessKeyId", "AccessKeySecret", "SecurityToken", "Expiration"}
    (the alibabacloud-credentials URLCredentialsProvider shape; docs/credentials.md)."""

    name = "uri"

    def __init__(self, *, url: str, timeout: float = 10.0, where: str = "credentials.url"):
        super().__init__(timeout)
        self.url = url
        self.where = where
        self._unreachable_hint = f"check {where} and the network (will retry)"

    def fetch(self) -> Snapshot:
        """One GET. Every failure is transient (the service is ours and recovers), each message
        naming the URL's key and what was wrong."""
        what = f"credentials URI {self.url} ({self.where})"
        r = self._get(self.url, "credentials URI", {"Accept": "application/json"})
        if r.status_code != 200:
            raise self._err(f"{what} answered {_status_text(r)}; will retry", transient=True,
                            code=f"HTTP{r.status_code}")
        doc = self._json(r, what, "it must answer JSON; will retry", transient=True)
        if not isinstance(doc, dict) or doc.get("Code") != "Success":
            code = doc.get("Code") if isinstance(doc, dict) else None
            raise self._err(f"{what} answered Code={code!r}, not \"Success\"; will retry", transient=True,
                            code="BadResponse")
        return self._snapshot(doc, what, transient=True)
