"""A host behind an ossyncd broker (source = "broker"): what the broker's answer says about this
host's registration, checked against the config (pure; docs/architecture.md §13).

- ``resolve_oss``: [oss] endpoint/bucket/region left out come from the broker; a value given
  that differs from the broker's is a ConfigError naming both.
- ``uncovered_watches``: watches whose keys may lie outside every registered prefix.
- ``denied_reason``: why OSS refused a key, when the registration explains it.
- ``heartbeat_url``: where heartbeats go (the wire contract is in docs/broker.md).
"""

from __future__ import annotations

import string
from urllib.parse import urlsplit, urlunsplit

from ossyncd.config import OssConfig, WatchConfig
from ossyncd.credentials.http import Registration
from ossyncd.errors import ConfigError
from ossyncd.objectspec import host_name
from ossyncd.paths import object_key


def resolve_oss(oss: OssConfig, reg: Registration, broker_url: str) -> OssConfig:
    """`oss` with what it leaves out taken from the broker. A value both give must agree."""
    update: dict[str, str] = {}
    for key in ("bucket", "region", "endpoint"):
        mine, theirs = getattr(oss, key), getattr(reg, key)
        if key == "endpoint" and theirs:
            try:
                theirs = OssConfig._endpoint(theirs)   # the same normal form as a configured one
            except ValueError as e:
                raise ConfigError(f"oss.endpoint: the credentials broker {broker_url} sent Endpoint {e}; "
                                  "fix the broker's [oss] endpoint, or set oss.endpoint") from None
        if mine and theirs and mine != theirs:
            raise ConfigError(f"oss.{key}: {mine!r} differs from {theirs!r}, which the credentials broker "
                              f"{broker_url} hands this host; remove oss.{key} to use the broker's, or fix "
                              f"the client's registration at the broker")
        if not mine:
            if not theirs and (key != "region" or oss.signature == "v4"):
                raise ConfigError(f"oss.{key}: not set, and the credentials broker {broker_url} did not send "
                                  f"{key.capitalize()}; set oss.{key}")
            update[key] = theirs
    return oss.model_copy(update=update) if update else oss


def watch_key_prefix(w: WatchConfig) -> str:
    """The part every key of the watch starts with: its key_template up to the first field that
    varies per file ({prefix} is the watch prefix, {host} this machine's name)."""
    out = ""
    for literal, field, _, _ in string.Formatter().parse(w.object.key_template):
        out += literal
        if field == "prefix":
            out += object_key(w.prefix, "") if w.prefix else ""
        elif field == "host":
            out += host_name()
        elif field is not None:
            break
    return out


def covered(key_prefix: str, prefixes: tuple[str, ...]) -> bool:
    """Every key starting with `key_prefix` lies under one of `prefixes` (the broker's policy
    grants `B/P*`: plain string prefixes)."""
    return any(key_prefix.startswith(p) for p in prefixes)


def uncovered_watches(watches: tuple[WatchConfig, ...], prefixes: tuple[str, ...]) -> list[tuple[WatchConfig, str]]:
    """(watch, its key prefix) for each watch whose keys may lie outside every registered prefix."""
    out = []
    for w in watches:
        p = watch_key_prefix(w)
        if not covered(p, prefixes):
            out.append((w, p))
    return out


def denied_reason(key: str, prefixes: tuple[str, ...] | None) -> str | None:
    """For an AccessDenied on `key`: the registration's explanation, or None when the key is
    inside it (then the generic reason stands)."""
    if prefixes is None or covered(key, prefixes):
        return None
    shown = ", ".join(prefixes) or "none"
    return (f"key {key} is outside the prefixes this host is registered for at the broker ({shown}); "
            "register it with `ossyncd broker add-client ... --prefix` or change watch.prefix")


def heartbeat_url(broker_url: str, override: str = "") -> str:
    """credentials.broker_heartbeat_url, else broker_url with its trailing /v1/credentials
    (optionally /TOKEN) replaced by /v1/heartbeat, keeping a path token's form. A URL of another
    shape has no heartbeat URL to derive: ""."""
    if override:
        return override
    parts = urlsplit(broker_url)
    path = parts.path.rstrip("/")
    head, sep, tail = path.rpartition("/v1/credentials")
    if not sep or "/" in tail.strip("/") or (tail and not tail.startswith("/")):
        return ""
    return urlunsplit(parts._replace(path=f"{head}/v1/heartbeat{tail}"))
