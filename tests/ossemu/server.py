"""HTTP plumbing: keep-alive threaded servers, request parsing, body streaming, control endpoints.

The OSS port is also an HTTP forward proxy for the endpoint names (`HTTP_PROXY=<oss url>`): a
request line with an absolute URI (`GET http://drop.oss-cn-hangzhou.aliyuncs.com/k HTTP/1.1`) is
served here, addressed by its host as OSS does (hosts.py); `sts.*` hosts get the STS service.
Other hosts are refused with 502 ProxyHostNotServed: nothing is forwarded anywhere.

Control endpoints on the OSS port, on an IP host (no auth):
    GET  /-/stats            counters (see faults.Stats.snapshot) + uploads_open, objects
    POST /-/stats/reset      zero the counters
    GET  /-/uploads          open multipart uploads with their parts
    GET  /-/objects          every object: bucket, key, size, etag, crc64, type
    GET  /-/faults           rules with remaining counts
    POST /-/faults           replace the rules with a JSON list (?append=1 to append)
    DELETE /-/faults         clear the rules
    POST /-/expire-tokens    every issued STS token expires now
    GET  /-/info             the same dict as the startup JSON line
"""

import json
import os
import re
import socket
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, unquote_to_bytes

from . import callback, ops
from . import xmlfmt as X
from .common import CHUNK
from .errors import ConnectionAbort, OSSError, StsError
from .hosts import hostname, is_ip_host
from .sts import error_json

DRAIN_LIMIT = 1 << 30
BODY_OPS = ("PutObject", "UploadPart")
NO_CRC64_XML = re.compile(rb"<HashCrc64ecma>([^<]*)</HashCrc64ecma>")
BAD_ERROR_BODY = b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad"


def _request_id():
    return os.urandom(12).hex().upper()


class BodyReader:
    """Streams a Content-Length or chunked body; applies reset/flip faults; counts bytes."""

    def __init__(self, rfile, length, chunked):
        self.rfile = rfile
        self.length = length
        self.chunked = chunked
        self.remaining = length or 0
        self.total = 0
        self.done = not chunked and not length
        self._chunk_left = 0
        self.on_bytes = None
        self.fault = None

    def _raw(self, n):
        if self.chunked:
            if self._chunk_left == 0:
                line = self.rfile.readline(1024)
                if not line:
                    raise ConnectionAbort("eof in chunked body")
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise ConnectionAbort("bad chunk size")
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass
                    self.done = True
                    return b""
                self._chunk_left = size
            data = self.rfile.read(min(n, self._chunk_left))
            if not data:
                raise ConnectionAbort("eof in chunk")
            self._chunk_left -= len(data)
            if self._chunk_left == 0:
                self.rfile.readline(8)
            return data
        data = self.rfile.read(min(n, self.remaining))
        if not data:
            raise ConnectionAbort("eof in body")
        self.remaining -= len(data)
        if self.remaining == 0:
            self.done = True
        return data

    def read(self, n=CHUNK):
        f = self.fault
        if f is not None and f.reset_after is not None:
            n = min(n, f.reset_after - self.total)
            if n <= 0 or self.done:
                raise ConnectionAbort("reset fault")
        if self.done:
            return b""
        data = self._raw(n)
        if not data:
            if f is not None and f.reset_after is not None:
                raise ConnectionAbort("reset fault")
            return data
        start = self.total
        self.total += len(data)
        if self.on_bytes:
            self.on_bytes(len(data))
        if f is not None and f.flip_bit:
            pos = f.flip_offset if f.flip_offset is not None else (self.length or 0) // 2
            if start <= pos < self.total:
                buf = bytearray(data)
                buf[pos - start] ^= 0x01
                data = bytes(buf)
                f.flip_bit = False
        return data

    def drain(self, limit=DRAIN_LIMIT):
        """Read and discard the rest; False if it was too large to drain."""
        while not self.done:
            if self.total > limit:
                return False
            self.read()
        return True


class Request:
    def __init__(self, handler):
        self.method = handler.command
        self.request_id = _request_id()
        self.client_ip = handler.client_address[0]
        target = handler.path
        authority = None
        if "://" in target.split("?", 1)[0]:   # absolute form: sent to us as a forward proxy
            authority, _, rest = target.split("://", 1)[1].partition("/")
            target = "/" + rest
        self.proxied = authority is not None
        # RFC 9112 3.2.2: the absolute URI's authority wins over Host
        self.hostname = hostname(authority if self.proxied else handler.headers.get("host"))
        self.raw_path, _, self.raw_query = target.partition("?")
        self.query = parse_qsl(self.raw_query, keep_blank_values=True, encoding="utf-8", errors="replace")
        self.qdict = dict(self.query)
        self._h = handler.headers
        self.headers = list(handler.headers.items())
        te = (self.header("transfer-encoding") or "").lower()
        cl = self.header("content-length")
        length = int(cl) if cl and cl.isdigit() else None
        self.body = BodyReader(handler.rfile, length, "chunked" in te)
        self.bucket = None
        self.key = None
        self.raw_key = ""
        self.principal = None

    def header(self, name):
        return self._h.get(name)

    def parse_target(self, endpoints):
        """Bucket and key from host + path (hosts.Endpoints.split); the key is percent-decoded exactly once."""
        bucket_raw, key_raw = endpoints.split(self.hostname, self.raw_path)
        if bucket_raw is None:
            return
        self.bucket = unquote(bucket_raw)
        self.raw_key = key_raw
        try:
            self.key = unquote_to_bytes(key_raw).decode("utf-8")
        except UnicodeDecodeError:
            raise OSSError(400, "InvalidObjectName", "The specified object is not valid (not UTF-8).",
                           ec="0016-00000005")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler, emu):
        self.emu = emu
        self._conns = {}
        self._conns_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        t = threading.Thread(target=self._serve_conn, args=(request, client_address), daemon=True)
        with self._conns_lock:
            self._conns[request] = t
        t.start()

    def _serve_conn(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except (ConnectionError, socket.timeout, OSError):
            pass
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._conns_lock:
                self._conns.pop(request, None)

    def close_connections(self, timeout=5.0):
        with self._conns_lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, t in conns:
            t.join(timeout)


class _BaseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    sys_version = ""
    timeout = 600

    def version_string(self):
        return self.server_version

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        if self.server.emu.verbose:
            sys.stderr.write("ossemu: %s %s\n" % (self.address_string(), fmt % args))

    def _send(self, status, headers, body=b"", length=None, head=False, close=False):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        if close:
            self.send_header("Connection", "close")
        self._headers_buffer.append(b"\r\n")
        if body and not head:
            self._headers_buffer.append(body)
        self.flush_headers()

    def _abort(self):
        """Close abruptly, no response."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.connection.close()

    def _json(self, status, obj, request_id=None):
        body = json.dumps(obj, indent=None).encode()
        hdrs = [("Content-Type", "application/json")]
        if request_id:
            hdrs.append(("x-oss-request-id", request_id))
        self._send(status, hdrs, body)

    # ---------------------------------------------------------- STS (own port, or sts.* host via the proxy)
    def _serve_sts(self, req):
        emu = self.server.emu
        # the SDKs put Action in the query; AssumeRoleWithOIDC counts (and faults) on its own
        op = "AssumeRoleWithOIDC" if req.qdict.get("Action") == "AssumeRoleWithOIDC" else "AssumeRole"
        emu.counters.request(op)
        fault = emu.faults.pick(op)
        try:
            if fault is not None:
                emu.counters.fault(op)
                req.body.fault = fault
                if fault.refuse:
                    raise ConnectionAbort("refused")
            body = b""
            while True:
                chunk = req.body.read(65536)
                if not chunk:
                    break
                body += chunk
                if len(body) > 1 << 20:
                    raise StsError(400, "InvalidParameter", "Request body too large.")
            params = dict(req.query)
            ctype = (req.header("content-type") or "").lower()
            if body and "application/x-www-form-urlencoded" in ctype:
                params.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
            if fault is not None:
                fault.sleep()
                if fault.status:
                    raise StsError(int(fault.status), fault.code, fault.message)
            if params.get("Action") == "AssumeRoleWithOIDC":
                result, jti = emu.assume_role.handle_oidc(params)
                emu.counters.oidc_token(jti)
            else:
                result = emu.assume_role.handle(req.method, params)
                emu.counters.session(params.get("RoleSessionName", ""))
            emu.counters.add("sts_issued")
            emu.counters.success(op)
            self._json(200, result)
        except StsError as e:
            emu.counters.error(op, e.code)
            headers = [("Content-Type", "application/json;charset=utf-8")]
            if fault is not None and fault.retry_after is not None:
                headers.append(("Retry-After", str(int(fault.retry_after))))
            bad = fault is not None and fault.bad_error_body and fault.status
            self._send(e.status, [("Content-Type", "text/html")] if bad else headers,
                       BAD_ERROR_BODY if bad else error_json(e, req.request_id))
        except ConnectionAbort:
            emu.counters.error(op, "ConnectionReset")
            self._abort()
        except Exception:
            traceback.print_exc()
            emu.counters.error(op, "InternalError")
            self._send(500, [("Content-Type", "application/json")],
                       error_json(StsError(500, "InternalError", "internal error"), req.request_id))


class OSSHandler(_BaseHandler):
    server_version = "AliyunOSS"

    def do_GET(self):
        self._dispatch()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self):
        emu = self.server.emu
        req = Request(self)
        if req.raw_path.startswith("/-/") and is_ip_host(req.hostname):   # never a named bucket's key
            return self._control(emu, req)
        if emu.endpoints.is_sts(req.hostname):
            return self._serve_sts(req)
        op, fault = "Unknown", None
        try:
            try:
                if req.proxied and not emu.endpoints.serves(req.hostname):
                    raise OSSError(502, "ProxyHostNotServed",
                                   f"The emulator as a proxy serves only its own endpoints "
                                   f"{', '.join(emu.endpoints.oss + emu.endpoints.sts)} (and BUCKET.<oss "
                                   f"endpoint>), not {req.hostname}; put that host in NO_PROXY.")
                req.parse_target(emu.endpoints)
                if req.bucket is None:
                    raise ops.not_implemented("Service-level requests")
                op = ops.route(req)
            finally:
                emu.counters.request(op)
                if req.header("x-oss-callback") is not None:
                    emu.counters.callback_header(op)
            if op in BODY_OPS:
                req.body.on_bytes = lambda n: emu.counters.body_bytes(op, n)
            fault = emu.faults.pick(op, req.key)
            if fault is not None:
                emu.counters.fault(op)
                req.body.fault = fault
                if fault.refuse:
                    raise ConnectionAbort("refused")
                if fault.status:
                    raise OSSError(int(fault.status), fault.code, fault.message)
            emu.storage.bucket(req.bucket)
            req.principal = emu.authority.authenticate(req)
            listing = op in ("ListObjects", "ListObjectsV2", "ListMultipartUploads")
            emu.authority.authorize(req.principal, op, req.bucket, req.key or None,
                                    prefix=req.qdict.get("prefix", "") if listing else None)
            if req.key:
                ops.validate_key(req.key)
            resp = ops.OPS[op](emu, req)
            if not req.body.done and not req.body.drain():
                resp.headers.append(("Connection", "close"))
            if fault is not None:
                if fault.strip_headers:
                    resp.headers = [(k, v) for k, v in resp.headers if k.lower() not in fault.strip_headers]
                if fault.reset_after is not None or fault.drop_response:
                    if resp.file is not None:
                        resp.file[0].close()
                    raise ConnectionAbort("reset fault")
                fault.sleep()
            if fault is not None and fault.truncate_body is not None:
                return self._truncated(op, req, resp, fault.truncate_body)
            self._reply(req, resp, fault)
            emu.counters.success(op)
        except OSSError as e:
            emu.counters.error(op, e.code)
            self._error(req, e, fault)
        except ConnectionAbort:
            emu.counters.error(op, "ConnectionReset")
            self._abort()
        except (ConnectionError, socket.timeout):
            emu.counters.error(op, "ClientGone")
            self.close_connection = True
        except Exception:
            traceback.print_exc()
            emu.counters.error(op, "InternalError")
            self._error(req, OSSError(500, "InternalError", "We encountered an internal error. Please try again."),
                        None)

    def _reply(self, req, resp, fault=None):
        head = req.method == "HEAD"
        headers = [("x-oss-request-id", req.request_id)] + resp.headers
        crc_fault = fault.crc64 if fault is not None else None
        if not self.server.emu.crc64 or crc_fault == "missing":  # like a server (or proxy) that sends no CRC64
            headers = [(k, v) for k, v in headers if k.lower() != "x-oss-hash-crc64ecma"]
            resp.body = NO_CRC64_XML.sub(b"", resp.body)
        elif crc_fault == "wrong":
            headers = [(k, str((int(v) + 1) % (1 << 64)) if k.lower() == "x-oss-hash-crc64ecma" else v)
                       for k, v in headers]
            resp.body = NO_CRC64_XML.sub(lambda m: b"<HashCrc64ecma>%d</HashCrc64ecma>" % (
                (int(m.group(1) or 0) + 1) % (1 << 64)), resp.body)
        if resp.file is None:
            self._send(resp.status, headers, resp.body, length=resp.length, head=head)
            return
        reader, offset, count = resp.file
        with reader:
            self._send(resp.status, headers, length=count, head=True)
            if not head and count:
                reader.sendfile(self.connection, offset, count)

    def _truncated(self, op, req, resp, n):
        """The truncate_body fault: the whole body announced, n bytes of it sent, then closed."""
        if resp.file is not None:
            reader, offset, length = resp.file
            sent = b""
            with reader:
                for chunk in reader.chunks(offset, length):
                    sent += chunk
                    if len(sent) >= n:
                        break
        else:
            sent, length = resp.body, len(resp.body)
        self._send(resp.status, [("x-oss-request-id", req.request_id)] + resp.headers, sent[:n], length=length)
        self.server.emu.counters.error(op, "TruncatedResponse")
        self._abort()

    def _error(self, req, e, fault):
        close = False
        try:
            close = not req.body.drain()
        except ConnectionAbort:
            return self._abort()
        except (ConnectionError, socket.timeout):
            self.close_connection = True
            return
        if fault is not None:
            fault.sleep()
        host = (req.header("host") or "localhost").split(":")[0]
        body = X.error_body(e.code, e.message, req.request_id, host, e.ec, e.extra)
        headers = [("x-oss-request-id", req.request_id), ("Content-Type", "application/xml")]
        if fault is not None and fault.retry_after is not None:
            headers.append(("Retry-After", str(int(fault.retry_after))))
        if fault is not None and fault.bad_error_body:   # a proxy's page cut short: not XML, no code
            body, headers[1] = BAD_ERROR_BODY, ("Content-Type", "text/html")
        if e.ec:
            headers.append(("x-oss-ec", e.ec))
        headers += list(e.headers.items())
        if req.method == "HEAD":
            headers.append(("x-oss-err", X.error_header(body)))
            self._send(e.status, headers, b"", length=0, head=True, close=close)
        else:
            self._send(e.status, headers, body, close=close)

    # ---------------------------------------------------------- control
    def _control(self, emu, req):
        path, m = req.raw_path, req.method
        try:
            data = b""
            while True:
                chunk = req.body.read()
                if not chunk:
                    break
                data += chunk
            if path == "/-/stats" and m == "GET":
                return self._json(200, emu.stats())
            if path == "/-/stats/reset" and m == "POST":
                emu.reset_stats()
                return self._json(200, emu.stats())
            if path == "/-/faults":
                if m == "GET":
                    return self._json(200, emu.faults.list())
                if m == "DELETE":
                    emu.clear_faults()
                    return self._json(200, [])
                if m == "POST":
                    rules = json.loads(data or b"[]")
                    rules = [rules] if isinstance(rules, dict) else rules
                    emu.set_faults(rules, append=req.qdict.get("append") in ("1", "true"))
                    return self._json(200, emu.faults.list())
            if path == "/-/expire-tokens" and m == "POST":
                return self._json(200, {"expired": emu.expire_tokens()})
            if path == "/-/uploads" and m == "GET":
                return self._json(200, emu.uploads())
            if path == "/-/objects" and m == "GET":
                return self._json(200, emu.objects(req.qdict.get("bucket")))
            if path == "/-/info" and m == "GET":
                return self._json(200, emu.info())
            if path == callback.PUB_KEY_PATH and m == "GET":   # what x-oss-pub-key-url names
                return self._send(200, [("Content-Type", "application/x-pem-file")], emu.signer.public_pem())
            return self._json(404, {"error": f"no control endpoint {m} {path}"})
        except (ValueError, TypeError) as e:
            return self._json(400, {"error": str(e)})
        except ConnectionAbort:
            return self._abort()


class STSHandler(_BaseHandler):
    server_version = "Tengine"

    def do_POST(self):
        self._serve_sts(Request(self))

    do_GET = do_POST


def make_server(host, port, handler, emu):
    return _Server((host, port), handler, emu)
