"""OSS upload callbacks (README "Upload callbacks", docs/wire-protocol.md §9): the config's
checks, the headers, the emulator's callback to a local application server (signed like OSS),
and the daemon recording each file's callback outcome without ever re-uploading."""

from __future__ import annotations

import base64
import json
import os
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlsplit

import oss2
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from ossyncd import objectspec
from ossyncd.config import parse_config
from ossyncd.crc import crc64
from ossyncd.errors import ConfigError
from ossyncd.objectspec import FileFacts
from tests.helpers import (
    LoopbackServer,
    MiB,
    object_bytes,
    ossyncd,
    random_file,
    sts_credentials,
    wait_until,
    write_config,
)
from tests.test_events import Receiver, add_hooks, free_port, outbox, webhook

SETTLE = 0.2


class AppServer:
    """The application server OSS calls: records each POST (path, headers, body) with whether
    its signature verified against the public key named in x-oss-pub-key-url; answers
    `status` with `answer`."""

    def __init__(self, status: int = 200, answer: bytes = b'{"Status":"OK"}', delay: float = 0):
        self.status, self.answer = status, answer
        self.released = threading.Event()   # set: stop holding answers back (delay)
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                call = {"path": self.path, "headers": dict(self.headers), "body": body,
                        "verified": verify(self.path, self.headers, body)}
                with outer.lock:
                    outer.calls.append(call)
                if delay:
                    outer.released.wait(delay)   # longer than the callback timeout: it times out
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.answer)))
                self.end_headers()
                self.wfile.write(outer.answer)

            def log_message(self, *a):
                pass

        self.http = LoopbackServer(Handler)
        self.url = self.http.url + "/oss/done%20cb?src=ossyncd"   # signed url-decoded: "done cb"

    def close(self):
        self.released.set()
        self.http.close()


def verify(path: str, headers, body: bytes) -> bool:
    """OSS's callback signature: RSA-MD5 over url-decoded path + query + "\\n" + body, checked with
    the public key fetched from base64(x-oss-pub-key-url), as an application server does."""
    key_url = base64.b64decode(headers["x-oss-pub-key-url"]).decode()
    pem = urllib.request.urlopen(key_url, timeout=10).read()
    key = serialization.load_pem_public_key(pem)
    p = urlsplit(path)
    signed = unquote(p.path).encode() + (b"?" + p.query.encode() if p.query else b"") + b"\n" + body
    try:
        key.verify(base64.b64decode(headers["Authorization"]), signed, padding.PKCS1v15(), hashes.MD5())
        return True
    except InvalidSignature:
        return False


@pytest.fixture
def app():
    a = AppServer()
    yield a
    a.close()


def _cfg(tmp_path, oss=None, **watch):
    return parse_config({"oss": {"endpoint": "http://127.0.0.1:9", "bucket": "drop", "signature": "v1", **(oss or {})},
                         "state": {"path": str(tmp_path / "s.db")},
                         "upload": watch.pop("upload", {}), "watch": [{"path": str(tmp_path), **watch}]})


def _decode(value: str) -> dict:
    return json.loads(base64.b64decode(value))


# ---------------------------------------------------------------- config and headers (pure)
@pytest.mark.parametrize("values, expected", [
    ({"callback_url": "ftp://app/x"}, "watch[0].callback_url: 'ftp://app/x' is not an http(s) URL"),
    ({"callback_url": ";".join(f"http://a{i}/" for i in range(6))}, "watch[0].callback_url: 6 URLs; OSS takes at most 5"),
    ({"callback_url": "http://a/", "callback_body": "o=${key}"}, "watch[0].callback_body: ${key} is not an OSS variable"),
    ({"callback_url": "http://a/", "callback_body": "p=${x:where}"}, "watch[0].callback_body: ${x:where} is not defined"),
    ({"callback_url": "http://a/", "callback_body": "p=${x:Team}", "callback_vars": {"x:Team": "a"}},
     "watch[0].callback_vars: 'x:Team': custom callback variables are named x:NAME in lowercase"),
    ({"callback_url": "http://a/", "callback_vars": {"team": "a"}}, "watch[0].callback_vars: 'team': custom"),
    ({"callback_url": "http://a/", "callback_body_type": "application/json", "callback_body": '{"o":"${object}"}'},
     "watch[0].callback_body: '{\"o\":\"${object}\"}' is not JSON once OSS substitutes its variables"),
    ({"callback_url": "http://a/", "callback_body_type": "text/plain"}, "watch[0].callback_body_type: Input should be"),
    ({"callback_body": "o=${object}"}, "watch[0].callback_body: only used with callback_url"),
    ({"callback_url": "http://a/", "callback_host": "a b"}, "watch[0].callback_host: 'a b' is not a host name"),
])
def test_config_errors_name_the_key_and_the_fix(tmp_path, values, expected):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, **values)
    assert str(e.value).startswith(expected), str(e.value)


def test_read_timeout_must_outlast_the_callback(tmp_path):
    """A client that gives up before OSS has its callback answer would send the file again."""
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, oss={"read_timeout": 16}, callback_url="http://a/;http://b/")
    assert str(e.value).startswith("oss.read_timeout: 16 s is too short with 2 callback_url(s)")
    assert "at least 20" in str(e.value)
    _cfg(tmp_path, oss={"read_timeout": 16}, callback_url="http://a/")
    _cfg(tmp_path, oss={"read_timeout": 1})


def test_callback_headers_and_inheritance_from_upload(tmp_path):
    cfg = _cfg(tmp_path, upload={"callback_url": ["http://a/cb", "http://b/cb"], "callback_vars": {"x:team": "ops"}},
               callback_body="o=${object}&t=${x:team}&p=${x:ossyncd_path}&m=${x:ossyncd_mtime}",
               callback_host="app.example.com")
    spec = cfg.watch[0].object
    assert spec.callback_url == ("http://a/cb", "http://b/cb") and spec.callback_vars == {"x:team": "ops"}
    facts = FileFacts("d/é.bin", 5, 0, path=str(tmp_path / "d/é.bin"), watch=str(tmp_path))
    h = objectspec.callback_headers(spec, facts)
    assert _decode(h["x-oss-callback"]) == {"callbackUrl": "http://a/cb;http://b/cb", "callbackHost": "app.example.com",
                                            "callbackBody": spec.callback_body,
                                            "callbackBodyType": "application/x-www-form-urlencoded"}
    assert _decode(h["x-oss-callback-var"]) == {"x:team": "ops", "x:ossyncd_path": str(tmp_path / "d/é.bin"),
                                                "x:ossyncd_mtime": "1970-01-01T00:00:00Z"}
    assert h["x-oss-callback"].isascii() and h["x-oss-callback-var"].isascii()
    assert objectspec.callback_headers(_cfg(tmp_path).watch[0].object, facts) == {}     # none configured
    assert "x-oss-callback" not in objectspec.put_headers(spec, facts)                 # never on Initiate
    assert "x-oss-callback" not in objectspec.complete_headers(spec)
    assert _cfg(tmp_path, callback_url="http://a/;http://b/").watch[0].object.callback_url == ("http://a/", "http://b/")
    # a watch turns inherited callbacks off; its own stray key is still an error
    off = _cfg(tmp_path, upload={"callback_url": "http://a/", "callback_vars": {"x:team": "ops"}}, callback_url=[])
    assert off.watch[0].object.callback_url == () and objectspec.callback_headers(off.watch[0].object, facts) == {}
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, upload={"callback_url": "http://a/"}, callback_url=[], callback_host="h")
    assert str(e.value).startswith("watch[0].callback_host: only used with callback_url")


# ---------------------------------------------------------------- the emulator
def _put(bucket, key, cb: dict | None, var: dict | None = None, raw: str | None = None):
    headers = {}
    if cb is not None or raw is not None:
        headers["x-oss-callback"] = raw if raw is not None else base64.b64encode(json.dumps(cb).encode()).decode()
    if var is not None:
        headers["x-oss-callback-var"] = base64.b64encode(json.dumps(var).encode()).decode()
    return bucket.put_object(key, b"hello callback", headers=headers)


def test_emulator_refuses_bad_callbacks_and_stores_nothing(emulator, root_bucket):
    good = {"callbackUrl": "http://127.0.0.1:9/", "callbackBody": "o=${object}"}
    bad = [
        (None, None, "%%%not base64"),
        ({"callbackBody": "o=${object}"}, None, None),
        ({"callbackUrl": "http://127.0.0.1:9/"}, None, None),
        ({**good, "callbackUrl": "ftp://127.0.0.1/"}, None, None),
        ({**good, "callbackUrl": ";".join(["http://127.0.0.1:9/"] * 6)}, None, None),
        ({**good, "callbackBodyType": "text/plain"}, None, None),
        ({**good, "callbackBody": "o=${key}"}, None, None),
        (good, {"team": "a"}, None),
        (good, {"x:Team": "a"}, None),
    ]
    for cb, var, raw in bad:
        with pytest.raises(oss2.exceptions.OssError) as e:
            _put(root_bucket, "bad.txt", cb, var, raw)
        assert (e.value.status, e.value.code) == (400, "InvalidArgument"), (cb, var, raw)
    assert not root_bucket.object_exists("bad.txt")


def test_emulator_calls_the_app_server_signed_and_answers_203_on_failure(emulator, root_bucket, app):
    cb = {"callbackUrl": app.url, "callbackHost": "app.example.com", "callbackBodyType": "application/json",
          "callbackBody": '{"o":${object},"s":${size},"e":${etag},"c":${crc64},"v":${x:v},"m":${mimeType}}'}
    r = _put(root_bucket, "dir/a b.txt", cb, {"x:v": "é"})
    assert r.status == 200 and r.resp.read() == b'{"Status":"OK"}'
    (call,) = app.calls
    assert call["verified"] and call["path"] == "/oss/done%20cb?src=ossyncd"
    assert call["headers"]["Host"] == "app.example.com" and call["headers"]["Content-Type"] == "application/json"
    data = b"hello callback"
    assert json.loads(call["body"]) == {"o": "dir/a b.txt", "s": len(data), "e": r.etag, "c": str(crc64(data)),
                                        "v": "é", "m": "text/plain"}
    # a form body: URL-encoded values; a tampered body fails verification
    cb = {"callbackUrl": app.url, "callbackBody": "o=${object}&s=${size}"}
    _put(root_bucket, "f/ü.txt", cb)
    form = app.calls[-1]
    assert parse_qs(form["body"].decode()) == {"o": ["f/ü.txt"], "s": [str(len(data))]} and form["verified"]
    assert not verify(form["path"], form["headers"], form["body"] + b"x")
    # the app server fails, or nobody listens: 203 CallbackFailed, the object is stored, the CRC64 is there
    app.status = 500
    r = _put(root_bucket, "fail.txt", cb)
    assert r.status == 203 and r.crc == crc64(data) and b"<Code>CallbackFailed</Code>" in r.resp.read()
    app.status, app.answer = 200, b"not json"
    r = _put(root_bucket, "notjson.txt", cb)
    assert r.status == 203 and b"Response body is not valid json format." in r.resp.read()
    r = _put(root_bucket, "down.txt", {**cb, "callbackUrl": f"http://127.0.0.1:{free_port()}/x"})
    assert r.status == 203 and b"cannot connect" in r.resp.read()
    for key in ("fail.txt", "notjson.txt", "down.txt"):
        assert root_bucket.get_object(key).read() == data
    # several URLs: tried in turn until one answers
    app.answer = b"{}"
    r = _put(root_bucket, "second.txt", {**cb, "callbackUrl": f"http://127.0.0.1:{free_port()}/x;{app.url}"})
    assert r.status == 200 and app.calls[-1]["body"] == f"o=second.txt&s={len(data)}".encode()
    assert emulator.stats()["callbacks"] == {"PutObject:ok": 3, "PutObject:failed": 3}


# ---------------------------------------------------------------- the daemon
@pytest.mark.timeout(120)
def test_daemon_records_each_callback_and_never_re_uploads(tmp_path, emulator, daemon_factory, app):
    """One daemon: watch `ok` calls a working app server (a simple and a multipart file), `bad`
    one that answers 500, `down` a port nobody listens on, `slow` one that answers after the
    emulator's callback timeout (OSS's 5 s, shortened to 1 s here). Every object is done and byte-equal;
    the callbacks are `ok` with the answer or `failed` with the reason (in `list`), a hook on
    callback_failed gets one event per failed file, and nothing is sent twice."""
    roots = {n: tmp_path / n for n in ("ok", "bad", "down", "slow")}
    for p in roots.values():
        p.mkdir()
    bad, slow = AppServer(status=500), AppServer(delay=30)
    emulator.callback_timeout = 1.0
    hooks = Receiver()
    try:
        body = "key=${object}&size=${size}&etag=${etag}&crc=${crc64}&path=${x:ossyncd_path}&rel=${x:ossyncd_relpath}"
        cb = {"callback_body": body, "settle_seconds": SETTLE}
        d = daemon_factory([{"path": str(roots["ok"]), "prefix": "ok/", "callback_url": app.url, **cb},
                            {"path": str(roots["bad"]), "prefix": "bad/", "callback_url": bad.url, **cb},
                            {"path": str(roots["down"]), "prefix": "down/",
                             "callback_url": f"http://127.0.0.1:{free_port()}/cb", **cb},
                            {"path": str(roots["slow"]), "prefix": "slow/", "callback_url": slow.url, **cb}])
        add_hooks(d, [webhook(hooks.url, on=["callback_failed"], name="cb")])
        d.start()
        files = {"ok/small.txt": random_file(roots["ok"] / "small.txt", 1000, 1),
                 "ok/sub/big.bin": random_file(roots["ok"] / "sub" / "big.bin", 2 * MiB + 17, 2),
                 "bad/b.txt": random_file(roots["bad"] / "b.txt", 500, 3),
                 "down/c.txt": random_file(roots["down"] / "c.txt", 700, 4),
                 "slow/s.txt": random_file(roots["slow"] / "s.txt", 900, 5)}
        d.wait_states({"done": 5}, 60)
        for key, data in files.items():
            assert object_bytes(emulator, key) == data
        rows = {os.path.relpath(f["path"], tmp_path): f for f in d.files()}
        for rel in ("ok/small.txt", "ok/sub/big.bin"):
            assert rows[rel]["callback"] == "ok" and rows[rel]["callback_detail"] == '{"Status":"OK"}', rows[rel]
        assert rows["bad/b.txt"]["callback"] == "failed"
        assert rows["bad/b.txt"]["callback_detail"] == "CallbackFailed: Error status : 500."
        assert rows["down/c.txt"]["callback"] == "failed" and "cannot connect" in rows["down/c.txt"]["callback_detail"]
        assert rows["slow/s.txt"]["callback"] == "failed" and "timed out after 1 s" in rows["slow/s.txt"]["callback_detail"]
        # what the app server got: OSS's values and ours, signed
        got = {parse_qs(c["body"].decode())["key"][0]: (parse_qs(c["body"].decode()), c["verified"]) for c in app.calls}
        assert sorted(got) == ["ok/small.txt", "ok/sub/big.bin"] and len(app.calls) == 2
        for key, (form, verified) in got.items():
            data, rel = files[key], key.removeprefix("ok/")
            assert verified
            assert form["size"] == [str(len(data))] and form["crc"] == [str(crc64(data))]
            assert form["etag"] == [rows["ok/" + rel]["etag"]]
            assert form["path"] == [str(roots["ok"] / rel)] and form["rel"] == [rel]
        assert len(bad.calls) == 1 and len(slow.calls) == 1
        # the multipart upload sent it on Complete only; nothing was sent twice
        st = emulator.stats()
        assert st["callback_headers"] == {"PutObject": 4, "CompleteMultipartUpload": 1}, st["callback_headers"]
        assert st["requests"]["PutObject"] == 4 and st["requests"]["CompleteMultipartUpload"] == 1
        assert st["callbacks"] == {"PutObject:ok": 1, "CompleteMultipartUpload:ok": 1, "PutObject:failed": 3}
        # `list` shows the reason; the hook gets one callback_failed per failed file
        r = ossyncd("list", "-c", d.config)
        line = next(x for x in r.stdout.splitlines() if x.startswith(str(roots["bad"] / "b.txt")))
        assert line.split("\t")[1] == "done" and "callback failed: CallbackFailed: Error status : 500." in line
        wait_until(lambda: len(hooks.events()) >= 3 and not outbox(d, "pending"), 30, what="callback_failed events")
        evs = hooks.events()
        assert sorted(e["key"] for e in evs) == ["bad/b.txt", "down/c.txt", "slow/s.txt"] and hooks.bad_signatures == 0
        assert all(e["kind"] == "callback_failed" and e["callback"] == "failed" and e["state"] == "done" for e in evs)
        assert next(e for e in evs if e["key"] == "bad/b.txt")["error"] == "CallbackFailed: Error status : 500."
        assert d.stop() == 0
        assert emulator.stats()["requests"]["PutObject"] == 4
    finally:
        bad.close()
        slow.close()
        hooks.close()



@pytest.mark.timeout(90)
def test_a_203_without_etag_or_crc64_is_verified_with_head(tmp_path, emulator, daemon_factory):
    """OSS's 203 carries the write headers; behind a proxy that strips them the daemon verifies
    the stored object with HeadObject (the full role may), never assumes it, and never re-sends."""
    drop = tmp_path / "drop"
    drop.mkdir()
    bad = AppServer(status=500)
    try:
        strip = ["ETag", "x-oss-hash-crc64ecma"]
        emulator.set_faults([{"op": "PutObject", "strip_headers": strip},
                             {"op": "CompleteMultipartUpload", "strip_headers": strip}])
        d = daemon_factory([{"path": str(drop), "settle_seconds": SETTLE, "callback_url": bad.url}],
                           credentials=sts_credentials(emulator, role_arn=emulator.full_role_arn))
        d.start()
        files = {"s.bin": random_file(drop / "s.bin", 3000, 1), "m.bin": random_file(drop / "m.bin", MiB + 5, 2)}
        d.wait_states({"done": 2}, 60)
        for key, data in files.items():
            assert object_bytes(emulator, key) == data
        for f in d.files():
            data = files[os.path.basename(f["path"])]
            assert f["crc64"] == str(crc64(data)) and f["verification"] == "crc64" and f["etag"], f
            assert f["callback"] == "failed" and f["callback_detail"] == "CallbackFailed: Error status : 500.", f
        st = emulator.stats()
        assert st["requests"]["HeadObject"] == 2 and st["faults"] == {"PutObject": 1, "CompleteMultipartUpload": 1}
        assert st["requests"]["PutObject"] == 1 and st["requests"]["CompleteMultipartUpload"] == 1
        assert d.stop() == 0
    finally:
        bad.close()


def test_upload_command_says_which_callback_failed(tmp_path, emulator):
    """`ossyncd upload` with a callback the application server refuses: the file is in OSS and
    verified (exit 0), and its `done` line says the callback failed and why."""
    bad = AppServer(status=500)
    try:
        cfg = write_config(tmp_path / "c.toml", emulator, state=tmp_path / "state.db",
                           upload={"callback_url": bad.url, "callback_body": "key=${object}"})
        src = tmp_path / "one.txt"
        data = random_file(src, 800, 11)
        r = ossyncd("upload", "-c", cfg, "--prefix", "cli/", src, timeout=60)
        assert r.returncode == 0, r.stderr
        assert object_bytes(emulator, "cli/one.txt") == data
        line = next(x for x in r.stderr.splitlines() if x.startswith("done "))
        assert line.endswith("; callback failed: CallbackFailed: Error status : 500."), line
        assert len(bad.calls) == 1
    finally:
        bad.close()
