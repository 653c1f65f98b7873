"""The HTTP JSON sources: ``broker`` (a credentials broker URL) and ``ecs-ram-role`` (the ECS
instance metadata service). Both GET a JSON document holding AccessKeyId / AccessKeySecret /
SecurityToken / Expiration; ``HttpJsonSource`` holds what they share."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import requests
import structlog

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


class BrokerSource(HttpJsonSource):
    """GET a credentials broker (the upload-with-STS pattern)."""

    name = "broker"
    _unreachable_hint = "check credentials.broker_url and the network (will retry)"

    def __init__(self, *, url: str, token: str = "", headers: dict[str, str] | None = None,
                 timeout: float = 10.0):
        """``url`` is an http(s) URL (config.CredentialsConfig checks credentials.broker_url)."""
        super().__init__(timeout)
        self.url = url
        self._token = token
        self._headers = dict(headers or {})

    def _secrets(self):
        return (self._token, *self._headers.values())

    def fetch(self) -> Snapshot:
        """One GET of the broker URL. CredentialsError: transient for network errors, 429 and 5xx;
        permanent for 4xx and a document without usable credentials."""
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
