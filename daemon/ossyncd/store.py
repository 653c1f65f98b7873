"""The object store: the only module that imports oss2.

`OssStore` is a thin, single-attempt ObjectStore over oss2 that classifies every
failure into the hierarchy of ossyncd.errors. Retries are not here: `retry.py`
wraps any ObjectStore (restic-style), so the policy is the same for every backend.

oss2's own CRC64 check is off (it runs crcmod in small chunks under the GIL and
is the client bottleneck); `body.Body` computes CRC-64/XZ natively while streaming
and we compare it with the x-oss-hash-crc64ecma OSS returns.

Every PutObject and UploadPart carries Content-MD5, so the server itself rejects a
body corrupted in transit (InvalidDigest, retried). A server that returns no CRC64
(some OSS-compatible servers, header-stripping proxies) is verified by MD5 instead:
the ETag of a PutObject or part is the hex MD5 of its bytes, and a multipart object
is verified through its parts (each part's ETag matched, and Complete accepted
exactly those parts). See docs/architecture.md (verification).
"""

from __future__ import annotations

import functools
import ipaddress
import threading
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Any, Callable, Protocol
from urllib.parse import quote, urlparse

import oss2
import requests
import structlog
from oss2.credentials import Credentials as Oss2Credentials

from ossyncd.body import READ_BLOCK, Body
from ossyncd.config import OssConfig
from ossyncd.crc import combine_parts
from ossyncd.errors import AuthExpired, IntegrityError, NoSuchUpload, NotSupported, PermanentError, StoreError, TransientError
from ossyncd.model import CRC64, MD5, CancelFlag, ObjectInfo, OpenUpload, PartRow, ServerPart, WriteResult

log = structlog.get_logger(__name__)
AUTH_EXPIRED_CODES = {"SecurityTokenExpired", "InvalidAccessKeyId", "InvalidSecurityToken"}
TRANSIENT_CODES = {"RequestTimeout", "ServiceUnavailable", "InternalError", "SlowDown", "Throttling",
                   "RequestTimeTooSkewed", "ConnectionReset"}
class ObjectStore(Protocol):
    """The narrow seam between the uploader (and the sweeper, check-config) and OSS. Every layer
    (OssStore, the metrics timing wrapper, RetryingStore, tests' MemoryStore) has exactly these
    methods. Errors are only ossyncd.errors types (RetryingStore adds CredentialsUnavailable and
    Cancelled). `cancel`: set when the caller gives up; a single-attempt store may ignore it,
    because a Body being sent stops reading when its own cancel flag is set."""

    def put(self, key: str, body: Body, *, headers: dict[str, str] | None = None,
            cancel: CancelFlag | None = None) -> WriteResult:
        """PutObject, with the object's headers (objectspec.put_headers). Raises IntegrityError
        when OSS's CRC64 (or, without one, the ETag) differs from the bytes sent. Idempotent: a repeat overwrites the same key."""
        ...

    def init_multipart(self, key: str, *, headers: dict[str, str] | None = None,
                       cancel: CancelFlag | None = None) -> str:
        """InitiateMultipartUpload with the object's headers; returns the upload id. Not idempotent (a new id each call)."""
        ...

    def upload_part(self, key: str, upload_id: str, number: int, body: Body, *,
                    cancel: CancelFlag | None = None) -> WriteResult:
        """UploadPart. IntegrityError on CRC mismatch; NoSuchUpload if the id is gone.
        Idempotent: re-sending a part number replaces it."""
        ...

    def complete(self, key: str, upload_id: str, parts: list[PartRow], *, headers: dict[str, str] | None = None,
                 cancel: CancelFlag | None = None) -> WriteResult:
        """CompleteMultipartUpload (headers: objectspec.complete_headers), verified against the
        combined part CRCs (IntegrityError).
        PermanentError with code InvalidPart (an ETag that is not the part's), InvalidPartOrder
        or EntityTooSmall (a part but the last below 100 KiB). Not idempotent: a repeat after
        success raises NoSuchUpload."""
        ...

    def head(self, key: str, *, cancel: CancelFlag | None = None) -> ObjectInfo | None:
        """HeadObject: the object's size, CRC64 and ETag, None if there is none. Needs
        oss:GetObject, which `ossyncd policy` grants only with overwrite != "allow"
        (recognising our own object after a crash, docs/architecture.md §4; also used to verify
        a callback's 203 stripped of ETag and CRC64). Read-only."""
        ...

    def list_parts(self, key: str, upload_id: str, *, cancel: CancelFlag | None = None) -> list[ServerPart]:
        """ListParts, all pages, by part number. NoSuchUpload if gone; NotSupported if the
        server lacks it. Read-only, so idempotent."""
        ...

    def abort(self, key: str, upload_id: str, *, cancel: CancelFlag | None = None) -> None:
        """AbortMultipartUpload. Idempotent: an already-gone upload is not an error."""
        ...

    def list_uploads(self, prefix: str, *, cancel: CancelFlag | None = None) -> list[OpenUpload]:
        """ListMultipartUploads under a prefix, all pages. Read-only, so idempotent."""
        ...

    def last_credentials(self) -> Any:
        """The credentials snapshot that signed this thread's last request (None before one),
        so that a refresh after AuthExpired replaces only that snapshot (single flight)."""
        ...

    def verification_mode(self) -> str | None:
        """How writes are verified, learned from the server's first write response: "crc64",
        "md5" (a server without x-oss-hash-crc64ecma: bodies need their MD5 up front), or None
        before the first write. Makes no request."""
        ...


class _BigBlockAdapter(requests.adapters.HTTPAdapter):
    """urllib3 sends file bodies in 16 KiB reads; reads of one body block (512 KiB) cut per-chunk Python overhead."""

    def init_poolmanager(self, *args, **kwargs):
        kwargs["blocksize"] = READ_BLOCK
        super().init_poolmanager(*args, **kwargs)


class _KeepSignature(requests.auth.AuthBase):
    """The OSS signature is the request's only auth: set as the session's auth, it keeps
    requests from reading ~/.netrc on every request (whose Basic credentials would replace it)."""

    def __call__(self, r):
        return r


class _QuickSession(requests.Session):
    """requests re-reads the proxy variables, NO_PROXY and the CA bundle variables for every
    request; a daemon's environment does not change, so they are read once per scheme and host
    (docs/architecture.md §5, per-request cost)."""

    def __init__(self):
        super().__init__()
        self.auth = _KeepSignature()
        self._env: dict[tuple, dict[str, Any]] = {}

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        if proxies:   # per-request proxies (oss2 passes none): the general path
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        u = urlparse(url)
        key = (u.scheme, u.netloc, stream, verify, cert)
        settings = self._env.get(key)
        if settings is None:
            settings = self._env[key] = super().merge_environment_settings(url, proxies, stream, verify, cert)
        return {**settings, "proxies": dict(settings["proxies"])}


class RotatingProvider(oss2.CredentialsProvider):
    """oss2 asks for credentials on every request; we hand out the current snapshot and
    remember, per thread, which one signed the last request (for single-flight refresh)."""

    def __init__(self, credentials):
        self.credentials = credentials      # the rotator: a reload replaces its source, not it
        self._last = threading.local()

    def get_credentials(self):
        snap = self.credentials.current()
        self._last.snapshot = snap
        return Oss2Credentials(snap.access_key_id, snap.access_key_secret, snap.security_token or None)

    def last_used(self):
        return getattr(self._last, "snapshot", None)


def is_ip_endpoint(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host == "localhost"


def object_url(cfg: OssConfig, key: str) -> str:
    return _url_base(cfg.public_base_url, cfg.endpoint, cfg.bucket) + quote(key, safe="/~")


@functools.lru_cache(maxsize=16)   # one endpoint parse per configuration, not one per file
def _url_base(public_base_url: str, endpoint: str, bucket: str) -> str:
    """Everything of an object URL before its key."""
    if public_base_url:
        return public_base_url.rstrip("/") + "/"
    u = urlparse(endpoint)
    if is_ip_endpoint(u.hostname or ""):
        return f"{u.scheme}://{u.netloc}/{bucket}/"
    return f"{u.scheme}://{bucket}.{u.netloc}/"


def classify(op: str, key: str, exc: Exception) -> StoreError:
    """Map an oss2 exception to our hierarchy."""
    if isinstance(exc, oss2.exceptions.RequestError):
        return TransientError(op, key, f"network error: {_short(exc)}")
    if isinstance(exc, oss2.exceptions.InconsistentError):
        return IntegrityError(op, key, "CRC64 mismatch reported by oss2", request_id=exc.request_id)
    if isinstance(exc, oss2.exceptions.OssError):
        status, code = exc.status, exc.code or ""
        msg = exc.message or exc.__class__.__name__
        kw = dict(status=status, code=code, request_id=exc.request_id)
        if code == "InvalidDigest":  # the body OSS received differs from our Content-MD5
            return IntegrityError(op, key, f"{msg} (body corrupted in transit, or the file changed while read)",
                                  **kw)
        if code in AUTH_EXPIRED_CODES:
            return AuthExpired(op, key, msg, **kw)
        if code == "NoSuchUpload":
            return NoSuchUpload(op, key, msg, **kw)
        if status == 501 or code == "NotImplemented":
            return NotSupported(op, key, msg, **kw)
        if (status is not None and (status >= 500 or status == 429)) or code in TRANSIENT_CODES or status in (-1, -2):
            return TransientError(op, key, msg, retry_after=_retry_after(exc), **kw)
        return PermanentError(op, key, msg, **kw)
    return TransientError(op, key, f"{type(exc).__name__}: {_short(exc)}")


def _retry_after(exc) -> float | None:
    """Retry-After in seconds (the HTTP-date form is not used by OSS)."""
    value = (getattr(exc, "headers", None) or {}).get("Retry-After", "")
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _with(result: WriteResult, callback: tuple[str, str] | None) -> WriteResult:
    return result if callback is None else replace(result, callback=callback[0], callback_detail=callback[1])


CALLBACK_ANSWER_MAX = 2000    # characters of the application server's answer kept in the state DB


def _clip(text: str) -> str:
    return text if len(text) <= CALLBACK_ANSWER_MAX else text[:CALLBACK_ANSWER_MAX] + "..."


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "..."


class OssStore:
    """The single-attempt ObjectStore over oss2. `cancel` is accepted and ignored: one request
    is not interrupted here, its Body stops reading when the caller's flag is set."""

    def __init__(self, cfg: OssConfig, credentials, *, pool_size: int = 8, page_size: int = 1000,
                 on_verification: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.page_size = page_size                # entries per listing page; OSS allows at most 1000
        self.provider = RotatingProvider(credentials)
        self.verification: str | None = None      # crc64 | md5, learned from the first write response
        self.on_verification = on_verification    # called with the mode when it is learned or changes
        self._lock = threading.Lock()
        if cfg.signature == "v4":
            auth = oss2.ProviderAuthV4(self.provider)
        else:
            auth = oss2.ProviderAuth(self.provider)
        adapter = _BigBlockAdapter(pool_connections=pool_size, pool_maxsize=pool_size)
        session = oss2.Session(adapter=adapter)
        session.session = _QuickSession()
        session.session.mount("http://", adapter)
        session.session.mount("https://", adapter)
        self.bucket = oss2.Bucket(
            auth, cfg.endpoint, cfg.bucket,
            session=session,
            connect_timeout=(cfg.connect_timeout, cfg.read_timeout),
            enable_crc=False,
            region=cfg.region or None,
            is_path_style=is_ip_endpoint(urlparse(cfg.endpoint).hostname or ""),
        )

    def last_credentials(self):
        return self.provider.last_used()

    def verification_mode(self) -> str | None:
        return self.verification

    def _call(self, op: str, key: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (oss2.exceptions.OssError, oss2.exceptions.RequestError) as e:
            raise classify(op, key, e) from None
        except requests.RequestException as e:
            raise TransientError(op, key, f"network error: {_short(e)}") from None

    def _verify(self, op: str, key: str, result, body: Body) -> WriteResult:
        if body.sent != body.size:
            raise IntegrityError(op, key, f"sent {body.sent} of {body.size} bytes")
        if result.crc is not None:
            if result.crc != body.crc64:
                raise IntegrityError(op, key, f"CRC64 mismatch: sent {body.crc64}, OSS stored {result.crc}",
                                     request_id=result.request_id)
            self._note_verification(CRC64)
            return WriteResult(result.etag, result.crc, CRC64)
        if body.md5 is None:
            raise IntegrityError(op, key, "OSS returned no x-oss-hash-crc64ecma and the body has no MD5; "
                                 "cannot verify", request_id=result.request_id)
        etag = (result.etag or "").strip('"').upper()
        if etag != body.md5.hex().upper():
            raise IntegrityError(op, key, f"ETag {etag or '(none)'} is not the MD5 {body.md5.hex().upper()} "
                                 f"of the bytes sent; a server without x-oss-hash-crc64ecma must return the MD5 "
                                 f"as ETag, or uploads to it cannot be verified", request_id=result.request_id)
        self._note_verification(MD5)
        return WriteResult(result.etag, body.crc64, MD5)

    def _note_verification(self, mode: str) -> None:
        """The server's capability, from its first write response (logged once, and on a change)."""
        if self.verification == mode:
            return
        with self._lock:
            if self.verification == mode:
                return
            self.verification = mode
        if mode == MD5:
            log.warning("server returns no x-oss-hash-crc64ecma; verifying uploads by Content-MD5 and ETag",
                        endpoint=self.cfg.endpoint)
        else:
            log.info("server returns x-oss-hash-crc64ecma; verifying uploads by CRC64", endpoint=self.cfg.endpoint)
        if self.on_verification is not None:
            self.on_verification(mode)

    def _headers(self, body: Body, extra: dict[str, str] | None = None) -> dict | None:
        md5 = body.content_md5()
        out = dict(extra or {})
        if md5:
            out["Content-MD5"] = md5
        return out or None

    def put(self, key: str, body: Body, *, headers: dict[str, str] | None = None,
            cancel: CancelFlag | None = None) -> WriteResult:
        r = self._call("PutObject", key, self.bucket.put_object, key, body.open(),
                       headers=self._headers(body, headers))
        callback = self._callback(r, headers)
        if body.sent != body.size:
            raise IntegrityError("PutObject", key, f"sent {body.sent} of {body.size} bytes")
        result = self._headed("PutObject", key, r, body.size, body.crc64) or self._verify("PutObject", key, r, body)
        return _with(result, callback)

    def init_multipart(self, key: str, *, headers: dict[str, str] | None = None,
                       cancel: CancelFlag | None = None) -> str:
        return self._call("InitiateMultipartUpload", key, self.bucket.init_multipart_upload, key,
                          headers=dict(headers) if headers else None).upload_id

    def upload_part(self, key: str, upload_id: str, number: int, body: Body, *,
                    cancel: CancelFlag | None = None) -> WriteResult:
        r = self._call("UploadPart", key, self.bucket.upload_part, key, upload_id, number, body.open(),
                       headers=self._headers(body))
        return self._verify("UploadPart", key, r, body)

    def complete(self, key: str, upload_id: str, parts: list[PartRow], *, headers: dict[str, str] | None = None,
                 cancel: CancelFlag | None = None) -> WriteResult:
        infos = [oss2.models.PartInfo(p.number, p.etag, size=p.size, part_crc=p.crc64) for p in parts]
        r = self._call("CompleteMultipartUpload", key, self.bucket.complete_multipart_upload, key, upload_id, infos,
                       headers=dict(headers) if headers else None)
        callback = self._callback(r, headers)
        expected = combine_parts([(p.crc64, p.size) for p in parts])
        headed = self._headed("CompleteMultipartUpload", key, r, sum(p.size for p in parts), expected)
        if headed is not None:
            return _with(headed, callback)
        if r.crc is None:   # verified through its parts: each was, and OSS joined exactly those
            return _with(WriteResult(r.etag, expected, MD5), callback)
        if r.crc != expected:
            raise IntegrityError("CompleteMultipartUpload", key,
                                 f"object CRC64 {r.crc} differs from the parts' combined {expected}",
                                 request_id=r.request_id)
        return _with(WriteResult(r.etag, r.crc, CRC64), callback)

    @staticmethod
    def _callback(r, headers: dict[str, str] | None) -> tuple[str, str] | None:
        """The upload callback's outcome and detail (docs/wire-protocol.md §9), None if none was
        asked for. The object is stored either way: 200 carries the application server's answer,
        203 an XML Error CallbackFailed (oss2 raises for neither: both are below 300)."""
        if not headers or "x-oss-callback" not in headers:
            return None
        text = r.resp.read().decode("utf-8", "replace")
        if r.status != 203:
            return "ok", _clip(text)
        try:
            root = ET.fromstring(text)
            why = f"{root.findtext('Code') or 'CallbackFailed'}: {root.findtext('Message') or '(no message)'}"
        except ET.ParseError:
            why = f"CallbackFailed: {_clip(text) or '(no body)'}"
        return "failed", why

    def _headed(self, op: str, key: str, r, size: int, crc: int) -> WriteResult | None:
        """A 203 that carries neither ETag nor CRC64 (OSS sends both; a proxy may strip them):
        the stored object is verified with HeadObject instead, never assumed. None otherwise."""
        if r.status != 203 or r.crc is not None or r.etag:
            return None
        try:
            info = self.head(key)
        except PermanentError as e:
            raise PermanentError(op, key, f"the object is stored, but the 203 answer carried no ETag or CRC64 and "
                                 f"HeadObject was refused ({e.code}); grant oss:GetObject so it can be verified",
                                 status=e.status, code=e.code, request_id=r.request_id) from None
        if info is None or info.size != size or info.crc64 != crc:
            raise IntegrityError(op, key, f"after a 203 without ETag or CRC64, HeadObject says {info}; expected "
                                 f"size {size} and CRC64 {crc}", request_id=r.request_id)
        self._note_verification(CRC64)
        return WriteResult(info.etag, crc, CRC64)

    def head(self, key: str, *, cancel: CancelFlag | None = None) -> ObjectInfo | None:
        try:
            r = self._call("HeadObject", key, self.bucket.head_object, key)
        except PermanentError as e:
            if e.status == 404:
                return None
            raise
        crc = r.headers.get("x-oss-hash-crc64ecma")
        return ObjectInfo(r.content_length, int(crc) if crc else None, (r.etag or "").strip('"'))

    def list_parts(self, key: str, upload_id: str, *, cancel: CancelFlag | None = None) -> list[ServerPart]:
        out: list[ServerPart] = []
        marker = ""
        while True:
            r = self._call("ListParts", key, self.bucket.list_parts, key, upload_id, marker=marker,
                           max_parts=self.page_size)
            out.extend(ServerPart(p.part_number, p.etag, p.size) for p in r.parts)
            if not r.is_truncated:
                return out
            marker = r.next_marker

    def abort(self, key: str, upload_id: str, *, cancel: CancelFlag | None = None) -> None:
        try:
            self._call("AbortMultipartUpload", key, self.bucket.abort_multipart_upload, key, upload_id)
        except NoSuchUpload:
            pass

    def list_uploads(self, prefix: str, *, cancel: CancelFlag | None = None) -> list[OpenUpload]:
        out: list[OpenUpload] = []
        key_marker = upload_marker = ""
        while True:
            r = self._call("ListMultipartUploads", prefix, self.bucket.list_multipart_uploads,
                           prefix=prefix, key_marker=key_marker, upload_id_marker=upload_marker,
                           max_uploads=self.page_size)
            out.extend(OpenUpload(u.key, u.upload_id, float(u.initiation_date)) for u in r.upload_list)
            if not r.is_truncated:
                return out
            key_marker, upload_marker = r.next_key_marker, r.next_upload_id_marker

    def url(self, key: str) -> str:
        return object_url(self.cfg, key)

    def signed_url(self, key: str, expires: int) -> str:
        return self._call("SignUrl", key, self.bucket.sign_url, "GET", key, expires, slash_safe=True)
