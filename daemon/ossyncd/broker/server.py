"""`ossyncd broker run`: the HTTP(S) service (wire contract: docs/broker.md).

A ThreadingHTTPServer on HOST:PORT (TLS when broker.tls_cert/tls_key are set; plain HTTP only
on loopback) or on a unix socket. The request line is never logged: /v1/credentials/TOKEN
carries the client's token in the path."""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ossyncd import log as logsetup
from ossyncd.config import parse_listen
from ossyncd.credentials.base import iso8601, mask_key_id
from ossyncd.errors import ConfigError, CredentialsError, StateError
from ossyncd.notify import Notifier

from .audit import Audit
from .config import BrokerConfig, load_broker_config
from .issuer import Issuer, Refused, answer
from .metrics import BrokerMetrics
from .registry import Client, Registry

log = logsetup.get_logger("ossyncd.broker")
MAX_BODY = 64 * 1024
HEARTBEAT_FIELDS: dict[str, Any] = {
    "version": str, "host": str, "states": dict, "queue": int, "failures": int,
    "last_upload": (str, type(None)), "credential_expiry": (str, type(None)), "sent_at": str,
}


def check_heartbeat(doc: Any) -> str | None:
    """What is wrong with a heartbeat body, or None."""
    if not isinstance(doc, dict):
        return "the body must be a JSON object"
    for key, kind in HEARTBEAT_FIELDS.items():
        if key not in doc:
            return f"{key}: required"
        v = doc[key]
        if isinstance(v, bool) or not isinstance(v, kind):
            return f"{key}: wrong type ({type(v).__name__})"
    if not 0 < len(doc["host"]) <= 255:
        return "host: must be 1-255 characters"
    if not all(isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 0
               for k, n in doc["states"].items()):
        return "states: must map a state name to a count"
    if doc["queue"] < 0 or doc["failures"] < 0:
        return "queue/failures: must not be negative"
    return None


class Broker:
    """Everything one request needs; the handler only parses and answers."""

    def __init__(self, cfg: BrokerConfig):
        self.cfg = cfg
        self.registry = Registry(cfg.broker.state)
        self.audit = Audit(cfg.broker.audit_path)
        self.metrics = BrokerMetrics()
        self.issuer = Issuer(cfg)

    def credentials(self, token: str | None, remote: str) -> tuple[int, dict, dict]:
        started = time.perf_counter()
        client: Client | None = None
        outcome = "denied"
        try:
            client = self.registry.by_token(token) if token else None
            if client is None:
                raise Refused(401, "Unauthorized", "missing or unknown broker token; send 'Authorization: Bearer "
                              "TOKEN' (or GET /v1/credentials/TOKEN) with the token add-client printed",
                              reason="unauthorized")
            if client.disabled:
                raise Refused(403, "ClientDisabled", f"client {client.name} is disabled on the broker; "
                              "`ossyncd broker enable-client` re-enables it", reason="disabled")
            self.issuer.admit(client)
            issued, cached = self.issuer.get(client)
            outcome = "cached" if cached else "issued"
            (self.metrics.cache_hits if cached else self.metrics.issued).labels(client.name).inc()
            if not cached:
                try:
                    self.registry.record_issue(client.name, issued.fetched_at, issued.snap.expires_at,
                                               mask_key_id(issued.snap.access_key_id))
                except StateError as e:   # the token is good; only the status view misses it
                    log.error("broker.registry_error", error=str(e))
            self.audit.record(decision="allow", client=client.name, remote=remote, session_name=issued.session_name,
                              key_id=issued.snap.access_key_id, expiry=issued.snap.expires_at,
                              policy_sha256=issued.policy_sha256, cached=cached)
            return 200, answer(issued, client, self.cfg), {}
        except Refused as r:
            outcome = "error" if r.reason == "sts" else "denied"
            if r.sts_code:
                self.metrics.sts_errors.labels(r.sts_code).inc()
            else:
                self.metrics.denials.labels(r.reason).inc()
            self.audit.record(decision="deny", client=client.name if client else None, remote=remote,
                              reason=r.reason, session_name=client.name if client else "", sts_code=r.sts_code,
                              status=r.status)
            return r.status, r.body(), r.headers
        except StateError as e:
            outcome = "error"
            log.error("broker.registry_error", error=str(e))
            self.metrics.denials.labels("registry").inc()
            self.audit.record(decision="deny", client=client.name if client else None, remote=remote,
                              reason="registry", status=503)
            return 503, {"Code": "ServiceUnavailable", "Message": "the broker's registry is unavailable"}, \
                {"Retry-After": "5"}
        finally:
            self.metrics.latency.labels(outcome).observe(time.perf_counter() - started)

    def heartbeat(self, token: str | None, remote: str, body: bytes) -> tuple[int, dict | None, dict]:
        try:
            client = self.registry.by_token(token) if token else None
            if client is None:
                self.metrics.denials.labels("unauthorized").inc()
                return 401, {"Code": "Unauthorized", "Message": "missing or unknown broker token"}, {}
            if client.disabled:
                self.metrics.denials.labels("disabled").inc()
                return 403, {"Code": "ClientDisabled", "Message": f"client {client.name} is disabled"}, {}
            try:
                self.issuer.admit(client)    # the same per-client budget as credentials requests
            except Refused as r:
                self.metrics.denials.labels(r.reason).inc()
                return r.status, r.body(), r.headers
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
                problem: str | None = "the body is not JSON"
            else:
                problem = check_heartbeat(doc)
            if problem:
                self.metrics.denials.labels("bad_request").inc()
                return 400, {"Code": "InvalidHeartbeat", "Message": f"heartbeat: {problem}"}, {}
            self.registry.heartbeat(client.name, doc["host"], doc, remote)
            self.metrics.heartbeats.inc()
            return 204, None, {}
        except StateError as e:
            log.error("broker.registry_error", error=str(e))
            return 503, {"Code": "ServiceUnavailable", "Message": "the broker's registry is unavailable"}, \
                {"Retry-After": "5"}

    def health(self) -> tuple[int, dict]:
        try:
            n = self.registry.check()
        except StateError as e:
            return 503, {"status": "error", "error": str(e)}
        return 200, {"status": "ok", "clients": n, "identity": self.issuer.identity.describe()}


class _Handler(BaseHTTPRequestHandler):
    server_version = "ossyncd-broker"
    protocol_version = "HTTP/1.1"
    broker: Broker

    def log_message(self, format: str, *args: Any) -> None:   # the request line may hold a token
        pass

    def address_string(self) -> str:
        return self.client_address[0] if isinstance(self.client_address, tuple) and self.client_address else "unix"

    def _remote(self) -> str:
        peer = self.address_string()
        fwd = self.headers.get("X-Forwarded-For")
        return f"{fwd.split(',')[0].strip()[:64]} via {peer}" if fwd else peer

    def _send(self, status: int, doc: dict | None, headers: dict | None = None, ctype: str = "application/json",
              raw: bytes | None = None) -> None:
        body = raw if raw is not None else (b"" if doc is None else json.dumps(doc).encode())
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if status != 204:
            self.wfile.write(body)

    def _token(self, base: str) -> str | None:
        path = self.path.split("?", 1)[0]
        if path.startswith(base + "/") and len(path) > len(base) + 1:
            return path[len(base) + 1:]
        auth = self.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        return value.strip() or None if scheme.lower() == "bearer" else None

    def _route(self) -> str:
        path = self.path.split("?", 1)[0]
        for base in ("/v1/credentials", "/v1/heartbeat"):
            if path == base or path.startswith(base + "/"):
                return base
        return path

    def _guard(self, fn) -> None:
        try:
            fn()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
            self.close_connection = True
        except Exception as e:   # a bug: seen in the log, answered, and the server goes on
            log.error("broker.request_failed", error=f"{type(e).__name__}: {e}", exc_info=True)
            try:
                self._send(500, {"Code": "InternalError", "Message": "internal error; see the broker's log"})
            except OSError:
                pass

    def do_GET(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def _get(self) -> None:
        route = self._route()
        if route == "/v1/credentials":
            status, doc, headers = self.broker.credentials(self._token(route), self._remote())
            self._send(status, doc, headers)
        elif route == "/healthz":
            status, doc = self.broker.health()
            self._send(status, doc)
        elif route == "/metrics":
            self._send(200, None, ctype="text/plain; version=0.0.4; charset=utf-8", raw=self.broker.metrics.render())
        else:
            self._send(404, {"Code": "NotFound", "Message": "no such endpoint; see docs/broker.md"})

    def _post(self) -> None:
        route = self._route()
        if route != "/v1/heartbeat":
            self._send(404, {"Code": "NotFound", "Message": "no such endpoint; see docs/broker.md"})
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY:
            self.close_connection = True
            self._send(400 if not length.isdigit() else 413,
                       {"Code": "InvalidHeartbeat", "Message": f"heartbeat: send a Content-Length up to {MAX_BODY}"})
            return
        body = self.rfile.read(int(length))
        status, doc, headers = self.broker.heartbeat(self._token(route), self._remote(), body)
        self._send(status, doc, headers)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def make_server(broker: Broker) -> socketserver.BaseServer:
    """Bound and listening; ConfigError naming the key on a bad listener or certificate."""
    cfg = broker.cfg.broker
    cfg.check_plain_http()
    # TCP_NODELAY: headers and body go out in two writes; with Nagle a keep-alive client waits
    # for the delayed ACK (~40 ms) on every answer
    handler = type("Handler", (_Handler,), {"broker": broker, "timeout": 30,
                                            "disable_nagle_algorithm": not cfg.unix_socket})
    server: socketserver.TCPServer
    try:
        if cfg.unix_socket:
            if os.path.exists(cfg.listen) and not os.path.isdir(cfg.listen):
                os.unlink(cfg.listen)   # a stale socket from the last run
            server = _UnixServer(cfg.listen, handler)
            os.chmod(cfg.listen, 0o660)
        else:
            host, port = parse_listen(cfg.listen)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            server = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})(
                (host, port), handler)
    except OSError as e:
        raise ConfigError(f"broker.listen: cannot listen on {cfg.listen!r}: {e.strerror}") from None
    if cfg.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        except (OSError, ssl.SSLError) as e:
            server.server_close()
            raise ConfigError(f"broker.tls_cert/tls_key: cannot load {cfg.tls_cert} and its key: "
                              f"{getattr(e, 'strerror', None) or e}; give a PEM certificate chain and its "
                              "private key") from None
        # handshake in the request's thread, so a slow client never holds up accept()
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server


def url_of(server: socketserver.BaseServer, cfg: BrokerConfig) -> str:
    if cfg.broker.unix_socket:
        return f"unix:{cfg.broker.listen}"
    addr: Any = server.server_address
    host, port = addr[0], addr[1]
    host = f"[{host}]" if ":" in str(host) else host
    return f"{'https' if cfg.broker.tls_cert else 'http'}://{host}:{port}"


def check_identity(broker: Broker) -> None:
    """The broker's own keys, fetched once before it listens. A permanent failure (an unset
    variable; for an STS identity, a wrong key or role) could answer nothing but 502: refuse to start, naming
    it. A transient one (the metadata service or STS not reachable yet): serve, answering 503
    with Retry-After, while the identity is retried with backoff."""
    try:
        broker.issuer.identity.current()
    except CredentialsError as e:
        if not e.transient:
            err = CredentialsError(f"the broker's own identity ([credentials]): {e}", source=e.source, code=e.code)
            log.error("broker.cannot_start", error=str(err))
            raise err from None
        log.warning("broker.identity_unavailable", error=str(e), retry_at=iso8601(broker.issuer.identity.retry_at()))


def run(config_path: str | None) -> int:
    """The service: listen, READY=1, serve until SIGTERM/SIGINT."""
    cfg = load_broker_config(config_path)
    logsetup.configure(cfg.broker.log_level, "json", stream=sys.stdout)
    logsetup.register_secrets([cfg.credentials.access_key_secret, cfg.credentials.security_token, cfg.broker.tls_key])
    broker = Broker(cfg)
    check_identity(broker)
    server = make_server(broker)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="broker-http",
                              daemon=True)
    thread.start()
    notifier = Notifier()
    log.info("broker.listening", url=url_of(server, cfg), clients=broker.registry.check(),
             identity=broker.issuer.identity.describe(), audit_log=str(cfg.broker.audit_path))
    notifier.send("READY=1", f"STATUS=serving on {url_of(server, cfg)}")
    while not stop.wait(min(1.0, notifier.watchdog_interval or 1.0)):
        if notifier.watchdog_interval:
            notifier.send("WATCHDOG=1")
    notifier.send("STOPPING=1")
    server.shutdown()
    server.server_close()
    if cfg.broker.unix_socket:
        try:
            os.unlink(cfg.broker.listen)
        except OSError:
            pass
    broker.audit.close()
    log.info("broker.stopped")
    return 0
