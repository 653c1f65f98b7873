"""Helpers shared by the op modules: the Response type and query-parameter parsing."""

from dataclasses import dataclass, field

from .errors import OSSError

CHUNK = 1 << 20


@dataclass
class Response:
    status: int = 200
    headers: list = field(default_factory=list)
    body: bytes = b""
    file: object = None       # GetObject: (storage.ObjectReader, offset, length)
    length: int = None        # Content-Length when it is not len(body) (HEAD, file bodies)


def int_param(q, name, default, lo, hi):
    raw = q.get(name, "")
    if raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        v = None
    if v is None or not lo <= v <= hi:
        raise OSSError(400, "InvalidArgument", f"Argument {name} is invalid.",
                       extra={"ArgumentName": name, "ArgumentValue": raw})
    return v


def url_encoded(q):
    enc = q.get("encoding-type", "")
    if enc not in ("", "url"):
        raise OSSError(400, "InvalidArgument", "The encoding-type is invalid.",
                       extra={"ArgumentName": "encoding-type", "ArgumentValue": enc})
    return enc == "url"


def etag(h):
    return f'"{h}"'
