"""Addressing: which service and bucket a request names, from its Host (or absolute URI) and path.

As OSS does:
  * an IP address or `localhost` as host: path style, `/bucket/key` (what oss2 sends to 127.0.0.1);
  * `BUCKET.oss-<region>[-internal].aliyuncs.com`: virtual-hosted, the bucket from the host and the
    key alone in the path (what oss2 and ali-oss send to a real endpoint name);
  * any other name (the endpoint itself included) with a bucket in the path: refused with 403
    SecondLevelDomainForbidden "Please use virtual hosted style to access.", the reply OSS gives
    to path-style access on its endpoint names (S3 SDKs forced to path style get exactly this
    status, code and message from oss-<region>.aliyuncs.com; OSS documents no EC, none is sent);
  * `sts.aliyuncs.com` and `sts.<region>.aliyuncs.com`: the STS service.

Signatures do not depend on the shape: V1 signs `/bucket/key` and V4's canonical URI is
`/bucket/key` in both (oss2 `ProviderAuthV4.__get_canonical_uri`).
"""

import ipaddress
from urllib.parse import urlsplit

from .errors import OSSError


def hostname(authority):
    """`host[:port]` -> the lowercased host name ('' when absent or malformed)."""
    try:
        return (urlsplit("//" + (authority or "")).hostname or "").lower()
    except ValueError:
        return ""


def is_ip_host(name):
    if name in ("", "localhost"):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Endpoints:
    """The endpoint names the emulator answers to, for one region."""

    def __init__(self, region):
        self.oss = (f"oss-{region}.aliyuncs.com", f"oss-{region}-internal.aliyuncs.com")
        self.sts = ("sts.aliyuncs.com", f"sts.{region}.aliyuncs.com")

    def is_sts(self, name):
        return name in self.sts

    def serves(self, name):
        """True for every name this emulator stands in for (what it accepts as a forward proxy)."""
        return is_ip_host(name) or self.is_sts(name) or any(
            name == e or name.endswith("." + e) for e in self.oss)

    def split(self, name, path):
        """(raw bucket or None, raw key) named by host + path; raises OSSError for path style on a name."""
        if is_ip_host(name):
            if path == "/" or not path.startswith("/"):
                return None, ""
            bucket, _, key = path[1:].partition("/")
            return bucket, key
        label, _, rest = name.partition(".")
        if label and rest in self.oss:
            return label, path[1:] if path.startswith("/") else path
        if path in ("", "/"):
            return None, ""
        raise OSSError(403, "SecondLevelDomainForbidden", "Please use virtual hosted style to access.")
