"""OSS upload callbacks (docs/wire-protocol.md §9): x-oss-callback on PutObject and
CompleteMultipartUpload.

`parse` checks the headers before anything is stored and rejects what OSS rejects (400
InvalidArgument). `answer` runs after the object is stored: it POSTs the substituted body to
each callbackUrl in turn until one answers 2xx with a JSON body, signed like OSS (RSA over
MD5, the public key's URL in x-oss-pub-key-url, served at GET /-/callback-pub-key.pem), 5 s
per URL and no retry; 200 with the application server's body, or 203 CallbackFailed.
"""

import base64
import binascii
import http.client
import json
import re
import threading
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from . import xmlfmt as X
from .common import Response
from .errors import OSSError

TIMEOUT = 5.0      # OSS's; Emulator.callback_timeout may shorten it for a test
MAX_URLS = 5
BODY_TYPES = ("application/x-www-form-urlencoded", "application/json")
SYSTEM_VARS = ("bucket", "object", "etag", "size", "mimeType", "crc64", "contentMd5", "imageInfo.height",
               "imageInfo.width", "imageInfo.format", "vpcId", "clientIp", "reqId", "operation")
NUMERIC = ("size", "imageInfo.height", "imageInfo.width")
PUB_KEY_PATH = "/-/callback-pub-key.pem"
VAR = re.compile(r"\$\{([^}]*)\}")
CUSTOM_NAME = re.compile(r"x:[a-z0-9_-]+")


def _invalid(message):
    return OSSError(400, "InvalidArgument", message)


@dataclass
class Callback:
    urls: list
    host: str | None
    body: str
    body_type: str
    variables: dict


def _b64json(value, what):
    try:
        raw = base64.b64decode(value, validate=True)
        return json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise _invalid(f"The {what} is not json format.") from None


def parse(req):
    """The request's callback (None without x-oss-callback), or OSSError as OSS answers it."""
    raw = req.header("x-oss-callback")
    if raw is None:
        return None
    cb = _b64json(raw, "callback configuration")
    if not isinstance(cb, dict):
        raise _invalid("The callback configuration is not json format.")
    url, body = cb.get("callbackUrl"), cb.get("callbackBody")
    if not isinstance(url, str) or not url.strip():
        raise _invalid("The callbackUrl is missing.")
    if not isinstance(body, str) or not body:
        raise _invalid("The callbackBody is missing.")
    urls = [u.strip() for u in url.split(";") if u.strip()]
    if len(urls) > MAX_URLS:
        raise _invalid(f"The callbackUrl has more than {MAX_URLS} URLs.")
    for u in urls:
        p = urlsplit(u)
        if p.scheme not in ("http", "https") or not p.hostname:
            raise _invalid(f"The callbackUrl {u} is invalid.")
    body_type = cb.get("callbackBodyType", BODY_TYPES[0])
    if body_type not in BODY_TYPES:
        raise _invalid(f"The callbackBodyType {body_type} is invalid.")
    host = cb.get("callbackHost")
    if host is not None and (not isinstance(host, str) or not host):
        raise _invalid("The callbackHost is invalid.")
    variables = {}
    raw_vars = req.header("x-oss-callback-var")
    if raw_vars is not None:
        variables = _b64json(raw_vars, "callback-var")
        if not isinstance(variables, dict):
            raise _invalid("The callback-var is not json format.")
        for name, value in variables.items():
            if not CUSTOM_NAME.fullmatch(name) or not isinstance(value, str):
                raise _invalid(f"The callback-var {name} is invalid: names are x: and lowercase, values strings.")
    for name in VAR.findall(body):
        if not name.startswith("x:") and name not in SYSTEM_VARS:
            raise _invalid(f"The callbackBody variable ${{{name}}} is not supported.")
    return Callback(urls, host, body, body_type, variables)


def _values(ctx, req, meta, op, content_md5):
    return {"bucket": req.bucket, "object": req.key, "etag": meta.etag, "size": meta.size,
            "mimeType": meta.content_type, "crc64": str(meta.crc64), "contentMd5": content_md5 or "",
            "imageInfo.height": "", "imageInfo.width": "", "imageInfo.format": "", "vpcId": "",
            "clientIp": req.client_ip, "reqId": req.request_id, "operation": op}


def substitute(cb, values):
    """OSS's substitution: URL-encoded values in a form body, JSON values in a JSON body; an
    undefined custom variable is empty."""
    def one(m):
        name = m.group(1)
        v = cb.variables.get(name, "") if name.startswith("x:") else values[name]
        if cb.body_type == "application/json":
            return json.dumps(v if name in NUMERIC and v != "" else str(v), ensure_ascii=False)
        return quote(str(v), safe="")
    return VAR.sub(one, cb.body)


class Signer:
    """One RSA key pair per emulator, made at the first callback."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key = None

    def key(self):
        with self._lock:
            if self._key is None:
                from cryptography.hazmat.primitives.asymmetric import rsa
                self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            return self._key

    def public_pem(self):
        from cryptography.hazmat.primitives import serialization
        return self.key().public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, data):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        return self.key().sign(data, padding.PKCS1v15(), hashes.MD5())


def string_to_sign(path, query, body):
    """url-decoded path + ("?" + query) + "\n" + body: what the Authorization header signs."""
    return unquote(path).encode() + (b"?" + query.encode() if query else b"") + b"\n" + body


def _post(ctx, cb, url, body):
    """One POST: (True, answer) or (False, the reason)."""
    timeout = ctx.callback_timeout
    p = urlsplit(url)
    conn_cls = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
    path = p.path or "/"
    headers = {"Host": cb.host or p.netloc, "Content-Type": cb.body_type, "Content-Length": str(len(body)),
               "User-Agent": "aliyun-oss-callback",
               "x-oss-pub-key-url": base64.b64encode(f"{ctx.oss_url}{PUB_KEY_PATH}".encode()).decode(),
               "Authorization": base64.b64encode(ctx.signer.sign(string_to_sign(path, p.query, body))).decode()}
    try:
        conn = conn_cls(p.hostname, p.port, timeout=timeout)
        try:
            conn.request("POST", path + (f"?{p.query}" if p.query else ""), body=body, headers=headers)
            resp = conn.getresponse()
            answer = resp.read()
        finally:
            conn.close()
    except TimeoutError:
        return False, f"Error status : -1.[callback to {url} timed out after {timeout:g} s]"
    except OSError as e:
        return False, f"Error status : -1.[cannot connect to {url}: {e.strerror or e}]"
    except http.client.HTTPException as e:
        return False, f"Error status : -1.[bad answer from {url}: {type(e).__name__}]"
    if not 200 <= resp.status < 300:
        return False, f"Error status : {resp.status}."
    try:
        json.loads(answer)
    except ValueError:
        return False, "Response body is not valid json format."
    return True, answer


def answer(ctx, req, cb, meta, op, headers, content_md5=None):
    """After the object is stored: the callback's response (200 or 203), with the write headers."""
    body = substitute(cb, _values(ctx, req, meta, op, content_md5)).encode()
    why = "no callbackUrl"
    for url in cb.urls:
        ok, got = _post(ctx, cb, url, body)
        if ok:
            ctx.counters.callback(op, "ok")
            return Response(headers=headers + [("Content-Type", "application/json")], body=got)
        why = got
    ctx.counters.callback(op, "failed")
    host = (req.header("host") or "localhost").split(":")[0]
    return Response(status=203, headers=headers + [("Content-Type", "application/xml")],
                    body=X.error_body("CallbackFailed", why, req.request_id, host))
