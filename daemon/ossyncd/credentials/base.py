"""What every credentials source shares: the Snapshot, the Source protocol and base class
(message scrubbing), Expiration parsing and the JSON credentials document."""

from __future__ import annotations

import calendar
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Protocol, runtime_checkable

import requests

from ossyncd.errors import CredentialsError

REDACTED = "<redacted>"


KEY_ID_PREFIXES = ("STS.", "LTAI")   # shared by every id of a kind: shown, but not counted as a clue


def mask_key_id(key_id: str | None) -> str:
    """Enough of an AccessKeyId to trace it in logs and the broker's audit, never the whole id:
    its kind prefix plus the next 4 characters, then ``****`` (``STS.NUd3****``)."""
    if not key_id:
        return ""
    prefix = next((p for p in KEY_ID_PREFIXES if key_id.startswith(p)), "")
    rest = key_id[len(prefix):]
    return prefix + (rest[:4] if len(rest) >= 12 else "") + "****"


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



@runtime_checkable
class Source(Protocol):
    name: str

    def fetch(self) -> Snapshot:
        """One network attempt: a usable Snapshot, or CredentialsError (``transient`` set when
        retrying can help). Never retries and never sleeps; RotatingCredentials does both."""
        ...


class SourceBase:
    """Every error a source raises goes through ``_err``, which scrubs the values ``_secrets``
    names (and folds the text to one bounded line)."""

    name = "?"
    max_message = 300   # characters of one error message

    def _secrets(self) -> Iterable[str]:
        return ()

    def _scrub(self, text: str) -> str:
        """One line, bounded, with every known secret value removed."""
        text = " ".join(str(text).split())
        for s in self._secrets():
            if s and len(s) >= 4:
                text = text.replace(s, REDACTED)
        if len(text) > self.max_message:
            text = text[:self.max_message - 3] + "..."
        return text

    def _err(self, message: str, *, transient: bool, code: str | None = None,
             retry_after: float | None = None) -> CredentialsError:
        return CredentialsError(self._scrub(message), transient=transient, source=self.name, code=code,
                                retry_after=retry_after)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def net_reason(exc: BaseException, timeout: float) -> str:
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


def ci_get(d: dict, key: str) -> Any:
    if key in d:
        return d[key]
    low = key.lower()
    for k, v in d.items():
        if isinstance(k, str) and k.lower() == low:
            return v
    return None


def snapshot_from_doc(doc: dict) -> Snapshot:
    """Build a Snapshot from AccessKeyId/AccessKeySecret/SecurityToken/Expiration. ValueError names missing keys."""
    ak = ci_get(doc, "AccessKeyId")
    sk = ci_get(doc, "AccessKeySecret")
    token = ci_get(doc, "SecurityToken")
    exp = ci_get(doc, "Expiration")
    missing = [n for n, v in (("AccessKeyId", ak), ("AccessKeySecret", sk)) if not v or not isinstance(v, str)]
    if not token or not isinstance(token, str):
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
