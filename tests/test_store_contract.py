"""The ObjectStore contract: the same cases on tests.fakes.MemoryStore and on OssStore against the
emulator (real oss2 over HTTP, STS credentials of the upload-only role), so the fake that the
in-process tests rely on behaves as the store the daemon uses."""

from __future__ import annotations

import hashlib
import inspect
import os
import random

import pytest

from ossyncd.body import Body
from ossyncd.crc import crc64
from ossyncd.errors import IntegrityError, NoSuchUpload, PermanentError
from ossyncd.metrics import _TimedStore
from ossyncd.model import CRC64, PartRow
from ossyncd.retry import RetryingStore
from ossyncd.store import ObjectStore, OssStore
from tests.fakes import MemoryStore
from tests.helpers import object_bytes, write_config

KiB = 1024
PREFIX = "c/"


class Backend:
    """A store under test, with what the cases need around it: read-back and a corrupted write."""

    def __init__(self, name, store, read, corrupt_next):
        self.name = name
        self.store = store
        self.read = read
        self.corrupt_next = corrupt_next   # corrupt_next(op): the next write of op stores a flipped bit


@pytest.fixture(params=["memory", "oss"])
def backend(request, tmp_path):
    if request.param == "memory":
        mem = MemoryStore()

        def corrupt(op):
            mem.corrupt_next += 1
        return Backend("memory", mem, mem.data, corrupt)
    from ossyncd.config import load_config
    from ossyncd.stack import build_credentials

    emu = request.getfixturevalue("emulator")
    (tmp_path / "in").mkdir()
    cfg = load_config(write_config(tmp_path / "c.toml", emu, state=tmp_path / "state.db",
                                   watches=[{"path": str(tmp_path / "in"), "prefix": PREFIX}]))
    # two entries a page, so that every listing below takes several pages
    store = OssStore(cfg.oss, build_credentials(cfg), page_size=2)
    return Backend("oss", store, lambda key: object_bytes(emu, key),
                   lambda op: emu.set_faults([{"op": op, "flip_bit": True, "count": 1}], append=True))


@pytest.fixture
def body_of(tmp_path):
    """body_of(data) -> a checksummed Body over a file holding `data`, as the uploader builds it."""
    fds = []

    def make(data: bytes, offset: int = 0, size: int | None = None) -> Body:
        path = tmp_path / f"src-{len(fds)}.bin"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        fds.append(fd)
        body = Body(str(path), fd, offset, len(data) - offset if size is None else size)
        body.checksum()
        return body
    yield make
    for fd in fds:
        os.close(fd)


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest().upper()


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def send_parts(store, key, upload_id, body_of, chunks) -> list[PartRow]:
    rows = []
    for number, chunk in enumerate(chunks, 1):
        r = store.upload_part(key, upload_id, number, body_of(chunk))
        assert r.crc64 == crc64(chunk) and r.etag.strip('"').upper() == md5_hex(chunk)
        rows.append(PartRow(number, r.etag, r.crc64, len(chunk)))
    return rows


def test_put_verified_and_read_back(backend, body_of):
    data = rand(300 * KiB + 7, 1)
    r = backend.store.put(PREFIX + "p.bin", body_of(data))
    assert (r.crc64, r.verification) == (crc64(data), CRC64)
    assert r.etag.strip('"').upper() == md5_hex(data)
    assert backend.read(PREFIX + "p.bin") == data
    r2 = backend.store.put(PREFIX + "p.bin", body_of(b"again"))   # idempotent: overwrites
    assert r2.crc64 == crc64(b"again") and backend.read(PREFIX + "p.bin") == b"again"


def test_multipart_complete_combines_part_crcs(backend, body_of):
    s, key = backend.store, PREFIX + "m.bin"
    chunks = [rand(100 * KiB, 2), rand(128 * KiB, 3), rand(5, 4)]
    upload_id = s.init_multipart(key)
    rows = send_parts(s, key, upload_id, body_of, chunks)
    r = s.complete(key, upload_id, rows)
    data = b"".join(chunks)
    assert (r.crc64, r.verification) == (crc64(data), CRC64)
    assert backend.read(key) == data


def test_part_replaced_by_resend(backend, body_of):
    s, key = backend.store, PREFIX + "r.bin"
    upload_id = s.init_multipart(key)
    send_parts(s, key, upload_id, body_of, [b"first"])
    rows = send_parts(s, key, upload_id, body_of, [b"second"])   # same number: replaces
    assert [(p.number, p.size) for p in s.list_parts(key, upload_id)] == [(1, 6)]
    s.complete(key, upload_id, rows)
    assert backend.read(key) == b"second"


def test_list_parts_all_pages(backend, body_of):
    s, key = backend.store, PREFIX + "lp.bin"
    chunks = [rand(10 + n, 10 + n) for n in range(5)]
    upload_id = s.init_multipart(key)
    send_parts(s, key, upload_id, body_of, [chunks[n] for n in (4, 0, 2, 1, 3)])   # any order
    listed = s.list_parts(key, upload_id)
    assert [p.number for p in listed] == [1, 2, 3, 4, 5]
    assert [(p.size, p.etag.strip('"').upper()) for p in listed] == \
        [(len(c), md5_hex(c)) for c in (chunks[n] for n in (4, 0, 2, 1, 3))]
    s.abort(key, upload_id)


def test_abort_is_idempotent_and_the_upload_is_gone(backend, body_of):
    s, key = backend.store, PREFIX + "a.bin"
    upload_id = s.init_multipart(key)
    send_parts(s, key, upload_id, body_of, [b"x" * 10])
    s.abort(key, upload_id)
    s.abort(key, upload_id)    # already gone: not an error
    assert upload_id not in {u.upload_id for u in s.list_uploads(PREFIX)}
    with pytest.raises(NoSuchUpload):
        s.list_parts(key, upload_id)
    with pytest.raises(NoSuchUpload):
        s.upload_part(key, upload_id, 2, body_of(b"late"))


def test_no_such_upload_after_complete(backend, body_of):
    s, key = backend.store, PREFIX + "c.bin"
    upload_id = s.init_multipart(key)
    rows = send_parts(s, key, upload_id, body_of, [b"only part"])
    s.complete(key, upload_id, rows)
    with pytest.raises(NoSuchUpload):
        s.complete(key, upload_id, rows)    # not idempotent
    with pytest.raises(NoSuchUpload):
        s.list_parts(key, upload_id)
    assert backend.read(key) == b"only part"


def test_list_uploads_by_prefix_all_pages(backend):
    s = backend.store
    keys = [PREFIX + "a/1", PREFIX + "a/1", PREFIX + "a/2", PREFIX + "ab", PREFIX + "b/1"]
    ids = {s.init_multipart(k): k for k in keys}
    listed = s.list_uploads(PREFIX + "a/")
    assert sorted((u.key, u.upload_id) for u in listed) == \
        sorted((k, i) for i, k in ids.items() if k.startswith(PREFIX + "a/"))
    assert [u.key for u in listed] == sorted(u.key for u in listed)
    assert len(s.list_uploads(PREFIX)) == 5
    assert all(u.initiated > 0 for u in listed)
    for i, k in ids.items():
        s.abort(k, i)
    assert s.list_uploads(PREFIX) == []


@pytest.mark.parametrize("op", ["PutObject", "UploadPart"])
def test_integrity_error_when_the_stored_bytes_differ(backend, body_of, op):
    s, key, data = backend.store, PREFIX + "bad.bin", rand(200 * KiB, 5)
    backend.corrupt_next(op)
    with pytest.raises(IntegrityError):
        if op == "PutObject":
            s.put(key, body_of(data))
        else:
            s.upload_part(key, s.init_multipart(key), 1, body_of(data))
    s.put(key, body_of(data))   # one corrupted write; the next is stored intact
    assert backend.read(key) == data


def test_invalid_part_on_a_wrong_etag_at_complete(backend, body_of):
    s, key = backend.store, PREFIX + "ip.bin"
    upload_id = s.init_multipart(key)
    rows = send_parts(s, key, upload_id, body_of, [rand(100 * KiB, 6), b"tail"])
    wrong = [PartRow(1, md5_hex(b"other bytes"), rows[0].crc64, rows[0].size), rows[1]]
    with pytest.raises(PermanentError) as e:
        s.complete(key, upload_id, wrong)
    assert e.value.code == "InvalidPart"
    assert s.complete(key, upload_id, rows).crc64 == crc64(rand(100 * KiB, 6) + b"tail")   # still open


def test_entity_too_small_at_complete(backend, body_of):
    s, key = backend.store, PREFIX + "small.bin"
    upload_id = s.init_multipart(key)
    rows = send_parts(s, key, upload_id, body_of, [b"small", b"tail"])
    with pytest.raises(PermanentError) as e:
        s.complete(key, upload_id, rows)
    assert e.value.code == "EntityTooSmall"
    with pytest.raises(PermanentError) as e:
        s.complete(key, upload_id, rows[::-1])   # sent sorted by number, so the same answer
    assert e.value.code == "EntityTooSmall"
    s.abort(key, upload_id)


PROTOCOL_METHODS = [n for n, v in vars(ObjectStore).items() if callable(v) and not n.startswith("_")]


@pytest.mark.parametrize("cls", [OssStore, RetryingStore, _TimedStore, MemoryStore], ids=lambda c: c.__name__)
def test_every_layer_has_the_protocol_signatures(cls):
    """A method added to one layer and not the others, or a keyword one layer lacks, is seam drift."""
    assert PROTOCOL_METHODS
    for name in PROTOCOL_METHODS:
        want = [(p.name, p.kind) for p in inspect.signature(getattr(ObjectStore, name)).parameters.values()]
        got = [(p.name, p.kind) for p in inspect.signature(getattr(cls, name)).parameters.values()]
        assert got == want, f"{cls.__name__}.{name}"
    assert not hasattr(cls, "__getattr__"), f"{cls.__name__} forwards unknown attributes"


def test_a_servers_retry_after_is_a_floor_under_the_backoff(emulator, tmp_path, body_of):
    """A 429 with Retry-After: 3 (real oss2 against the emulator) is waited out, not retried
    at once by the jittered backoff."""
    import threading

    from ossyncd.config import load_config
    from ossyncd.retry import Backoff
    from ossyncd.stack import build_credentials

    class RecordedWaits(threading.Event):   # the cancel flag: records each backoff wait, waits none
        def __init__(self):
            super().__init__()
            self.waits = []

        def wait(self, timeout=None):
            self.waits.append(timeout)
            return False

    (tmp_path / "in").mkdir()
    cfg = load_config(write_config(tmp_path / "c.toml", emulator, state=tmp_path / "state.db",
                                   watches=[{"path": str(tmp_path / "in"), "prefix": PREFIX}]))
    creds = build_credentials(cfg)
    store = RetryingStore(OssStore(cfg.oss, creds), creds, attempts=3, backoff=Backoff(base=0.01, cap=0.02))
    emulator.set_faults([{"op": "PutObject", "status": 429, "code": "Throttling", "retry_after": 3, "count": 1}])
    data = rand(5000, 7)
    cancel = RecordedWaits()
    store.put(PREFIX + "retry-after.bin", body_of(data), cancel=cancel)
    assert cancel.waits == [3.0], cancel.waits
    assert object_bytes(emulator, PREFIX + "retry-after.bin") == data
    emulator.set_faults([{"op": "PutObject", "status": 503, "retry_after": 300, "count": 1}])
    cancel = RecordedWaits()
    store.put(PREFIX + "capped.bin", body_of(data), cancel=cancel)
    assert cancel.waits == [60.0], cancel.waits   # RETRY_AFTER_MAX: longer waits are the file's retry


def test_a_netrc_entry_for_the_endpoint_does_not_replace_the_signature(emulator, tmp_path, body_of, monkeypatch):
    """requests would add ~/.netrc's Basic credentials for the endpoint's host over the OSS
    Authorization header; the store never reads it (docs/architecture.md §5, per-request cost)."""
    from urllib.parse import urlparse

    from ossyncd.config import load_config
    from ossyncd.stack import build_credentials

    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {urlparse(emulator.oss_url).hostname} login someone password other\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    (tmp_path / "in").mkdir()
    cfg = load_config(write_config(tmp_path / "c.toml", emulator, state=tmp_path / "state.db",
                                   watches=[{"path": str(tmp_path / "in"), "prefix": PREFIX}]))
    store = OssStore(cfg.oss, build_credentials(cfg))
    data = rand(5000, 8)
    for i in range(2):   # the second request takes the cached environment settings
        assert store.put(PREFIX + f"netrc-{i}.bin", body_of(data)).crc64 == crc64(data)
    monkeypatch.delenv("NETRC")   # the read-back is a bare oss2 bucket: it would send the netrc's login
    assert [object_bytes(emulator, PREFIX + f"netrc-{i}.bin") for i in range(2)] == [data, data]
