"""Emulator: multipart rules and resumable uploads through the real oss2 client."""

import hashlib
import os

import anycrc
import oss2
import pytest
from oss2.models import PartInfo

pytestmark = pytest.mark.timeout(60)
CRC = anycrc.Model("CRC64-XZ")
KiB = 1024
PART = 100 * KiB


def _parts(bucket, key, upload_id, blobs, start=1):
    out = []
    for i, blob in enumerate(blobs, start):
        r = bucket.upload_part(key, upload_id, i, blob)
        assert r.crc == CRC.calc(blob) and r.etag == hashlib.md5(blob).hexdigest().upper()
        out.append(PartInfo(i, r.etag, size=len(blob), part_crc=r.crc))
    return out


def test_multipart_list_parts_paging_and_complete(root_bucket, emulator):
    key = "mp/big.bin"
    blobs = [os.urandom(PART) for _ in range(4)] + [os.urandom(1234)]
    up = root_bucket.init_multipart_upload(key).upload_id
    assert len(up) == 32
    parts = _parts(root_bucket, key, up, blobs)
    assert emulator.stats()["uploads_open"] == 1

    # ListParts paging: 5 parts, max_parts=2 -> 3 pages, NextPartNumberMarker always present
    pages, marker = [], ""
    while True:
        res = root_bucket.list_parts(key, up, marker=marker, max_parts=2)
        pages.append([p.part_number for p in res.parts])
        if not res.is_truncated:
            break
        marker = res.next_marker
    assert pages == [[1, 2], [3, 4], [5]]
    listed = list(oss2.PartIterator(root_bucket, key, up, max_parts=1))
    assert [(p.part_number, p.size, p.etag) for p in listed] == [(p.part_number, p.size, p.etag) for p in parts]

    r = root_bucket.complete_multipart_upload(key, up, parts)  # oss2 checks the combined CRC
    data = b"".join(blobs)
    assert r.crc == CRC.calc(data)
    assert r.etag.endswith("-5")
    h = root_bucket.head_object(key)
    assert h.object_type == "Multipart" and h.content_length == len(data) and h.server_crc == CRC.calc(data)
    assert root_bucket.get_object(key).read() == data
    # ranges spanning the part boundaries of a multipart object
    assert root_bucket.get_object(key, byte_range=(PART - 10, 3 * PART + 9)).read() == data[PART - 10:3 * PART + 10]
    assert root_bucket.get_object(key, byte_range=(4 * PART + 5, None)).read() == data[4 * PART + 5:]
    up2 = root_bucket.init_multipart_upload("mp/copy").upload_id
    c = root_bucket.upload_part_copy("drop", key, (PART - 1, 2 * PART), "mp/copy", up2, 1)
    root_bucket.complete_multipart_upload("mp/copy", up2, [PartInfo(1, c.etag)])
    assert root_bucket.get_object("mp/copy").read() == data[PART - 1:2 * PART + 1]
    assert emulator.stats()["uploads_open"] == 0
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        root_bucket.upload_part(key, up, 6, b"late")
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        root_bucket.list_parts(key, up)


def test_overwrite_part_and_complete_all(root_bucket):
    key = "mp/all"
    up = root_bucket.init_multipart_upload(key).upload_id
    _parts(root_bucket, key, up, [b"a" * PART, b"old"])
    root_bucket.upload_part(key, up, 2, b"new!")  # latest upload of a part number wins
    r = root_bucket.complete_multipart_upload(key, up, None, headers={"x-oss-complete-all": "yes"})
    assert r.status == 200
    assert root_bucket.get_object(key).read() == b"a" * PART + b"new!"


def test_abort(root_bucket, emulator):
    up = root_bucket.init_multipart_upload("ab").upload_id
    root_bucket.upload_part("ab", up, 1, b"x" * 10)
    assert root_bucket.abort_multipart_upload("ab", up).status == 204
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        root_bucket.abort_multipart_upload("ab", up)
    with pytest.raises(oss2.exceptions.NoSuchUpload):  # the id is bound to its key
        root_bucket.list_parts("other", root_bucket.init_multipart_upload("ab").upload_id)
    assert emulator.stats()["uploads_open"] == 1


def test_list_uploads_paging(root_bucket):
    ids = {}
    for key in ["a/1", "a/2", "b", "b", "b", "c/d/e"]:
        ids.setdefault(key, []).append(root_bucket.init_multipart_upload(key).upload_id)
    got = [(u.key, u.upload_id) for u in oss2.MultipartUploadIterator(root_bucket, max_uploads=2)]
    want = sorted((k, i) for k, v in ids.items() for i in v)
    assert got == want  # key order, then initiation order within a key
    pages, km, um = [], "", ""
    while True:
        res = root_bucket.list_multipart_uploads(key_marker=km, upload_id_marker=um, max_uploads=2, delimiter="/")
        pages.append([u.key for u in res.upload_list] + res.prefix_list)
        if not res.is_truncated:
            break
        km, um = res.next_key_marker, res.next_upload_id_marker
    assert pages == [["b", "a/"], ["b", "b"], ["c/"]]
    assert [u.key for u in oss2.MultipartUploadIterator(root_bucket, prefix="a/")] == ["a/1", "a/2"]


def test_complete_errors(root_bucket):
    key = "mp/errors"
    up = root_bucket.init_multipart_upload(key).upload_id
    parts = _parts(root_bucket, key, up, [b"1" * PART, b"2" * PART, b"3"])

    def complete_err(plist):
        with pytest.raises(oss2.exceptions.ServerError) as ei:
            root_bucket.complete_multipart_upload(key, up, plist)
        return ei.value

    e = complete_err([parts[0], PartInfo(2, "0" * 32), parts[2]])
    assert (e.status, e.code) == (400, "InvalidPart")
    e = complete_err(parts + [PartInfo(9, parts[0].etag)])
    assert (e.status, e.code) == (400, "InvalidPart")
    e = complete_err([parts[0], parts[0], parts[1]])  # oss2 sorts, so use a duplicate
    assert (e.status, e.code) == (400, "InvalidPartOrder")
    # the failed attempts left the upload intact
    assert root_bucket.complete_multipart_upload(key, up, parts).status == 200


def test_entity_too_small(root_bucket):
    key = "mp/small"
    up = root_bucket.init_multipart_upload(key).upload_id
    parts = _parts(root_bucket, key, up, [b"s" * 50 * KiB, b"t" * PART])
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        root_bucket.complete_multipart_upload(key, up, parts)
    assert (ei.value.status, ei.value.code) == (400, "EntityTooSmall")
    # a small *last* part is fine; parts may have gaps
    up2 = root_bucket.init_multipart_upload(key).upload_id
    p1 = _parts(root_bucket, key, up2, [b"u" * PART])
    p3 = _parts(root_bucket, key, up2, [b"v" * 10], start=3)
    assert root_bucket.complete_multipart_upload(key, up2, p1 + p3).status == 200


def test_upload_part_copy(root_bucket):
    src = os.urandom(3 * PART)
    root_bucket.put_object("src", src)
    up = root_bucket.init_multipart_upload("dst").upload_id
    r1 = root_bucket.upload_part_copy("drop", "src", (0, PART - 1), "dst", up, 1)
    r2 = root_bucket.upload_part_copy("drop", "src", (PART, 3 * PART - 1), "dst", up, 2)
    root_bucket.complete_multipart_upload("dst", up, [PartInfo(1, r1.etag), PartInfo(2, r2.etag)])
    assert root_bucket.get_object("dst").read() == src


def test_resumable_upload_resumes_missing_parts_only(root_bucket, emulator, tmp_path):
    path = tmp_path / "file.bin"
    data = os.urandom(5 * PART + 777)  # 6 parts
    path.write_bytes(data)
    store = oss2.ResumableStore(root=str(tmp_path / "ckpt"))
    kw = dict(store=store, multipart_threshold=PART, part_size=PART, num_threads=1)
    emulator.set_faults([{"op": "UploadPart", "skip": 2, "count": 1, "status": 503, "code": "ServiceUnavailable"}])
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        oss2.resumable_upload(root_bucket, "resumed.bin", str(path), **kw)
    assert ei.value.status == 503
    assert emulator.stats()["requests"]["UploadPart"] == 3 and emulator.stats()["parts_received"] == 2

    emulator.reset_stats()
    r = oss2.resumable_upload(root_bucket, "resumed.bin", str(path), **kw)
    s = emulator.stats()
    assert s["requests"]["UploadPart"] == 4 and s["parts_received"] == 4
    assert s["bytes_received"] == len(data) - 2 * PART
    assert s["requests"]["ListParts"] >= 1
    assert "InitiateMultipartUpload" not in s["requests"]
    assert r.crc == CRC.calc(data)
    assert root_bucket.get_object("resumed.bin").read() == data
    assert s["uploads_open"] == 0


def test_concurrent_parts_and_objects(root_bucket, tmp_path):
    import threading

    path = tmp_path / "par.bin"
    data = os.urandom(12 * PART + 5)
    path.write_bytes(data)
    errors = []

    def puts(i):
        try:
            for j in range(10):
                root_bucket.put_object(f"par/{i}/{j}", b"%d" % j)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=puts, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    r = oss2.resumable_upload(root_bucket, "par.bin", str(path), store=oss2.ResumableStore(root=str(tmp_path)),
                              multipart_threshold=PART, part_size=PART, num_threads=4)
    for t in threads:
        t.join()
    assert not errors and r.crc == CRC.calc(data)
    assert root_bucket.get_object("par.bin").read() == data
    assert len(list(oss2.ObjectIterator(root_bucket, prefix="par/"))) == 40
