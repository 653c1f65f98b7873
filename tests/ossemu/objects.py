"""Object operations: PutObject, multipart writes, Head/Get/Delete.

Every op function takes (ctx, req) and returns a Response; errors are raised as OSSError.
`ctx` is the Emulator (storage, authority, counters); `req` is server.Request.
"""

import base64
import hashlib
import os
import queue
import threading
import time
import xml.etree.ElementTree as ET
from urllib.parse import unquote

from . import callback, props
from . import xmlfmt as X
from .auth import content_md5_ok
from .common import CHUNK, Response, etag, int_param, url_encoded
from .errors import OSSError
from .storage import CRC64, MAX_PART_NUMBER, ObjectMeta, Part

PIPELINE_MIN = 8 << 20   # bodies at least this big are hashed on a helper thread
MAX_OBJECT = 5 * 1024 ** 3
STORED_HEADERS = ("cache-control", "content-disposition", "content-encoding", "content-language", "expires")
RESPONSE_OVERRIDES = {"response-content-type": "Content-Type", "response-content-language": "Content-Language",
                      "response-expires": "Expires", "response-cache-control": "Cache-Control",
                      "response-content-disposition": "Content-Disposition",
                      "response-content-encoding": "Content-Encoding"}


def _stored_headers(req):
    out = {}
    for k, v in req.headers:
        lk = k.lower()
        if lk.startswith("x-oss-meta-") or lk in STORED_HEADERS or lk in props.STORED:
            out[lk] = v
    return out


def _write_headers(meta):
    return [("ETag", etag(meta.etag)), ("x-oss-hash-crc64ecma", str(meta.crc64))]


def _content_length(req, limit):
    if req.body.chunked:
        return None
    n = req.body.length
    if n is None:
        raise OSSError(411, "MissingContentLength", "You must provide the Content-Length HTTP header.")
    if n > limit:
        raise OSSError(400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size.",
                       extra={"MaxSizeAllowed": limit, "ProposedSize": n})
    return n


class _HashingWriter:
    """MD5 + CRC64 + write of each chunk; on a helper thread for large bodies, so that hashing
    and disk writes overlap with socket reads (hashlib and file writes release the GIL)."""

    def __init__(self, f, threaded):
        self.f, self.md5, self.crc, self.size, self.error = f, hashlib.md5(), 0, 0, None
        self.q = queue.Queue(8) if threaded else None
        if threaded:
            self.t = threading.Thread(target=self._run, daemon=True)
            self.t.start()

    def _consume(self, chunk):
        self.md5.update(chunk)
        self.crc = CRC64.calc(chunk, self.crc)
        self.f.write(chunk)

    def _run(self):
        while True:
            chunk = self.q.get()
            if chunk is None:
                return
            if self.error is None:
                try:
                    self._consume(chunk)
                except BaseException as e:  # reported by put()/close()
                    self.error = e

    def put(self, chunk):
        self.size += len(chunk)
        if self.q is None:
            return self._consume(chunk)
        if self.error is not None:
            raise self.error
        self.q.put(chunk)

    def close(self):
        if self.q is not None:
            self.q.put(None)
            self.t.join()
        if self.error is not None:
            raise self.error


def receive_body(ctx, req, limit):
    """Stream the request body to a temp file. Returns (tmp, size, md5 digest, crc64)."""
    length = _content_length(req, limit)
    limit_bits = req.header("x-oss-traffic-limit")
    rate = None
    if limit_bits is not None:
        if not limit_bits.isdigit() or not 819200 <= int(limit_bits) <= 838860800:
            raise OSSError(400, "InvalidArgument", "Invalid x-oss-traffic-limit.", ec="0017-00000801")
        rate = int(limit_bits) / 8.0
    tmp = ctx.storage.tmp_path()
    t0 = time.monotonic()
    try:
        with open(tmp, "wb", buffering=0) as f:
            w = _HashingWriter(f, threaded=length is None or length >= PIPELINE_MIN)
            try:
                while True:
                    chunk = req.body.read(CHUNK if rate is None else min(CHUNK, max(8192, int(rate / 10))))
                    if not chunk:
                        break
                    w.put(chunk)
                    if w.size > limit:
                        raise OSSError(400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size.")
                    if rate is not None:
                        ahead = w.size / rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
            finally:
                w.close()
        digest = w.md5.digest()
        cmd5 = req.header("content-md5")
        if cmd5 is not None and not content_md5_ok(cmd5, digest):
            raise OSSError(400, "InvalidDigest", "The Content-MD5 you specified was invalid.", ec="0016-00000402",
                           extra={"Content-MD5": cmd5})
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return tmp, w.size, digest, w.crc


def _unlink_quiet(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_small_body(req, limit=10 << 20):
    data = bytearray()
    while True:
        chunk = req.body.read(CHUNK)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise OSSError(400, "InvalidArgument", "The request body is too large.")
    cmd5 = req.header("content-md5")
    if cmd5 is not None and not content_md5_ok(cmd5, hashlib.md5(data).digest()):
        raise OSSError(400, "InvalidDigest", "The Content-MD5 you specified was invalid.", ec="0016-00000402")
    return bytes(data)


def _forbid_overwrite(req):
    return (req.header("x-oss-forbid-overwrite") or "").lower() == "true"


# ---------------------------------------------------------------- writes
def put_object(ctx, req):
    props.check_write(ctx, req)
    cb = callback.parse(req)   # a bad callback is refused before anything is stored
    forbid = _forbid_overwrite(req)
    if forbid and ctx.storage.exists(req.bucket, req.key):
        raise ctx.storage.exists_error()
    tmp, size, digest, crc = receive_body(ctx, req, MAX_OBJECT)
    meta = ObjectMeta(key=req.key, size=size, etag=digest.hex().upper(), crc64=crc,
                      content_type=req.header("content-type") or "application/octet-stream",
                      mtime=time.time(), headers=_stored_headers(req))
    try:
        ctx.storage.commit_object(req.bucket, meta, [(tmp, size)], forbid_overwrite=forbid)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    headers = _write_headers(meta) + [("Content-MD5", base64.b64encode(digest).decode())]
    if cb is not None:
        return callback.answer(ctx, req, cb, meta, "PutObject", headers, base64.b64encode(digest).decode())
    return Response(headers=headers)


def _part_number(req):
    n = int_param(req.qdict, "partNumber", None, 1, MAX_PART_NUMBER)
    if n is None:
        raise OSSError(400, "InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive.",
                       extra={"ArgumentName": "partNumber", "ArgumentValue": ""})
    return n


def upload_part(ctx, req):
    number = _part_number(req)
    ctx.storage.check_upload(req.bucket, req.key, req.qdict["uploadId"])
    tmp, size, digest, crc = receive_body(ctx, req, MAX_OBJECT)
    part = Part(number, size, digest.hex().upper(), crc, time.time())
    ctx.storage.commit_part(req.bucket, req.key, req.qdict["uploadId"], part, tmp)
    ctx.counters.add("parts_received")
    return Response(headers=[("ETag", etag(part.etag)), ("x-oss-hash-crc64ecma", str(crc)),
                             ("Content-MD5", base64.b64encode(digest).decode())])


def upload_part_copy(ctx, req):
    number = _part_number(req)
    ctx.storage.check_upload(req.bucket, req.key, req.qdict["uploadId"])
    src = req.header("x-oss-copy-source")
    path = src.split("?", 1)[0]
    sb, _, sk = path.lstrip("/").partition("/")
    sk = unquote(sk)
    ctx.authority.authorize(req.principal, "GetObject", sb, sk)
    meta, reader = ctx.storage.open(sb, sk)
    with reader:
        start, end = 0, meta.size - 1
        rng = req.header("x-oss-copy-source-range")
        if rng:
            r = _parse_range(rng, meta.size)
            if r is None or r == "unsatisfiable":
                raise OSSError(400, "InvalidArgument", "The x-oss-copy-source-range is invalid.")
            start, end = r
        tmp = ctx.storage.tmp_path()
        md5, crc = hashlib.md5(), 0
        with open(tmp, "wb") as out:
            for chunk in reader.chunks(start, end - start + 1):
                md5.update(chunk)
                crc = CRC64.calc(chunk, crc)
                out.write(chunk)
    part = Part(number, end - start + 1, md5.hexdigest().upper(), crc, time.time())
    ctx.storage.commit_part(req.bucket, req.key, req.qdict["uploadId"], part, tmp)
    body = X.document("CopyPartResult", [X.element("LastModified", X.iso8601(part.mtime)),
                                         X.element("ETag", etag(part.etag))])
    return Response(headers=[("Content-Type", "application/xml"), ("ETag", etag(part.etag)),
                             ("x-oss-hash-crc64ecma", str(crc))], body=body)


def initiate(ctx, req):
    props.check_write(ctx, req)
    url = url_encoded(req.qdict)
    up = ctx.storage.initiate(req.bucket, req.key, req.header("content-type") or "application/octet-stream",
                              _stored_headers(req), forbid_overwrite=_forbid_overwrite(req))
    ctx.counters.add("uploads_initiated")
    body = [X.element("Bucket", req.bucket), f"<Key>{X.maybe_url(req.key, url)}</Key>",
            X.element("UploadId", up.upload_id)]
    if url:
        body.append(X.element("EncodingType", "url"))
    return Response(headers=[("Content-Type", "application/xml")],
                    body=X.document("InitiateMultipartUploadResult", body))


def complete(ctx, req):
    url = url_encoded(req.qdict)
    complete_all = (req.header("x-oss-complete-all") or "").lower() == "yes"
    ctx.storage.check_upload(req.bucket, req.key, req.qdict["uploadId"])
    cb = callback.parse(req)
    data = read_small_body(req)
    requested = []
    if complete_all:
        if data.strip():
            raise OSSError(400, "InvalidArgument", "Should not specify the part list when x-oss-complete-all is yes.")
    else:
        try:
            root = ET.fromstring(data)
            if root.tag != "CompleteMultipartUpload":
                raise ValueError(root.tag)
            for p in root.findall("Part"):
                requested.append((int(p.findtext("PartNumber")), p.findtext("ETag") or ""))
        except (ET.ParseError, ValueError, TypeError):
            raise OSSError(400, "MalformedXML", "The XML you provided was not well-formed or did not validate "
                                                "against our published schema.", ec="0042-00000250")
    acl = req.header("x-oss-object-acl")   # oss2's resumable upload sends the ACL on Complete
    if acl is not None and acl not in props.ACLS:
        raise OSSError(400, "InvalidArgument", "no such object access control exists",
                       extra={"ArgumentName": "x-oss-object-acl", "ArgumentValue": acl})
    meta = ctx.storage.complete(req.bucket, req.key, req.qdict["uploadId"], requested,
                                complete_all=complete_all, forbid_overwrite=_forbid_overwrite(req),
                                headers={"x-oss-object-acl": acl} if acl else None)
    ctx.counters.add("uploads_completed")
    if cb is not None:   # the application server's answer replaces CompleteMultipartUploadResult
        return callback.answer(ctx, req, cb, meta, "CompleteMultipartUpload", _write_headers(meta))
    body = []
    if url:
        body.append(X.element("EncodingType", "url"))
    body += [X.element("Location", f"{ctx.oss_url}/{req.bucket}/{req.raw_key}"), X.element("Bucket", req.bucket),
             f"<Key>{X.maybe_url(req.key, url)}</Key>", X.element("ETag", etag(meta.etag))]
    return Response(headers=_write_headers(meta) + [("Content-Type", "application/xml")],
                    body=X.document("CompleteMultipartUploadResult", body))


def abort(ctx, req):
    ctx.storage.abort(req.bucket, req.key, req.qdict["uploadId"])
    ctx.counters.add("uploads_aborted")
    return Response(status=204)


def delete_object(ctx, req):
    ctx.storage.delete(req.bucket, req.key)
    return Response(status=204)


# ---------------------------------------------------------------- reads
def _parse_range(value, size):
    """(start, end) inclusive, None to ignore the header, or 'unsatisfiable'."""
    if not value.startswith("bytes=") or "," in value:
        return None
    a, sep, b = value[6:].strip().partition("-")
    if not sep or (not a and not b) or (a and not a.isdigit()) or (b and not b.isdigit()):
        return None
    if not a:
        n = int(b)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(a)
    end = int(b) if b else size - 1
    if end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def _object_headers(meta, q=None):
    h = [("Content-Type", meta.content_type), ("ETag", etag(meta.etag)),
         ("Last-Modified", X.http_date(meta.mtime)), ("x-oss-object-type", meta.type),
         ("x-oss-hash-crc64ecma", str(meta.crc64)), ("Accept-Ranges", "bytes")]
    h += props.response_headers(meta.headers)
    h += [(k, v) for k, v in meta.headers.items() if k not in props.STORED]
    for param, header in RESPONSE_OVERRIDES.items():
        if q and q.get(param):
            h = [(k, v) for k, v in h if k.lower() != header.lower()] + [(header, q[param])]
    return h


def head_object(ctx, req):
    meta = ctx.storage.head(req.bucket, req.key)
    return Response(headers=_object_headers(meta, req.qdict), length=meta.size)


def get_object_meta(ctx, req):
    meta = ctx.storage.head(req.bucket, req.key)
    return Response(headers=[("ETag", etag(meta.etag)), ("Last-Modified", X.http_date(meta.mtime)),
                             ("x-oss-hash-crc64ecma", str(meta.crc64))], length=meta.size)


def get_object(ctx, req):
    meta, reader = ctx.storage.open(req.bucket, req.key)
    headers = _object_headers(meta, req.qdict)
    rng = req.header("range")
    r = _parse_range(rng, meta.size) if rng else None
    if r == "unsatisfiable":
        reader.close()
        raise OSSError(416, "InvalidRange", "The requested range cannot be satisfied",
                       ec="0003-00000405", headers={"Content-Range": f"bytes */{meta.size}"})
    if r is None:
        return Response(headers=headers, file=(reader, 0, meta.size), length=meta.size)
    start, end = r
    headers.append(("Content-Range", f"bytes {start}-{end}/{meta.size}"))
    return Response(status=206, headers=headers, file=(reader, start, end - start + 1), length=end - start + 1)
