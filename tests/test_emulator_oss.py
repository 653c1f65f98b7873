"""Emulator: basic object operations through the real oss2 client (root key, V1 and V4)."""

import os
import re

import anycrc
import oss2
import pytest
import requests

pytestmark = pytest.mark.timeout(60)
CRC = anycrc.Model("CRC64-XZ")
HTTP_DATE = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                       r"\d{4} \d\d:\d\d:\d\d GMT$")
WEIRD_KEYS = ["with space.txt", "plus+sign", "per%cent%2F", "uni/中文/ключ/🙂", "a/b/c/d.bin",
              "q?x=1&y=2#frag", "eq=sign", "tilde~star*(paren)", "semi;colon,comma", "  lead and trail  ",
              "dir/", "back\\slash", "x" * 1000]


def v4_bucket(emu, key_id=None, secret=None, region=None):
    auth = oss2.AuthV4(key_id or emu.root.id, secret or emu.root.secret)
    return oss2.Bucket(auth, emu.oss_url, "drop", region=region or emu.region)


def test_put_get_head_delete_v1(root_bucket):
    data = b"hello world" * 1000
    r = root_bucket.put_object("dir/a.txt", data, headers={"x-oss-meta-color": "blue"})
    assert r.status == 200 and r.crc == CRC.calc(data)
    assert r.etag == __import__("hashlib").md5(data).hexdigest().upper()
    assert re.fullmatch(r"[0-9A-F]{24}", r.request_id)

    g = root_bucket.get_object("dir/a.txt")
    assert g.read() == data and g.server_crc == CRC.calc(data)
    h = root_bucket.head_object("dir/a.txt")
    assert h.content_length == len(data) and h.object_type == "Normal" and h.etag == r.etag
    assert h.content_type == "text/plain"  # guessed by oss2 from the extension
    assert HTTP_DATE.match(h.headers["Last-Modified"]) and h.headers["x-oss-meta-color"] == "blue"
    assert root_bucket.object_exists("dir/a.txt")

    assert root_bucket.delete_object("dir/a.txt").status == 204
    assert root_bucket.delete_object("dir/a.txt").status == 204  # missing is fine
    with pytest.raises(oss2.exceptions.NoSuchKey):
        root_bucket.get_object("dir/a.txt")
    with pytest.raises(oss2.exceptions.NoSuchKey) as ei:  # HEAD error via x-oss-err
        root_bucket.head_object("dir/a.txt")
    assert ei.value.code == "NoSuchKey" and ei.value.request_id
    assert not root_bucket.object_exists("dir/a.txt")


def test_v4_roundtrip_and_empty_object(emulator):
    b = v4_bucket(emulator)
    assert b.put_object("v4/empty", b"").crc == 0
    assert b.get_object("v4/empty").read() == b""
    b.put_object("v4/x.bin", b"\x00\x01" * 5000)
    assert b.get_object("v4/x.bin").read() == b"\x00\x01" * 5000
    assert b.get_object("v4/x.bin", byte_range=(1, 4)).read() == b"\x01\x00\x01\x00"
    big = os.urandom(9 << 20)  # large bodies are hashed on a helper thread
    assert b.put_object("v4/big", big).crc == CRC.calc(big)
    assert b.get_object("v4/big").read() == big
    assert [o.key for o in oss2.ObjectIteratorV2(b, prefix="v4/")] == ["v4/big", "v4/empty", "v4/x.bin"]


def test_range_get(root_bucket):
    data = bytes(range(256)) * 40
    root_bucket.put_object("r", data)
    g = root_bucket.get_object("r", byte_range=(10, 19))
    assert g.status == 206 and g.read() == data[10:20]
    assert g.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    assert root_bucket.get_object("r", byte_range=(None, 5)).read() == data[-5:]
    assert root_bucket.get_object("r", byte_range=(len(data) - 3, None)).read() == data[-3:]
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        root_bucket.get_object("r", byte_range=(len(data), len(data) + 5))
    assert ei.value.status == 416 and ei.value.code == "InvalidRange"


def test_chunked_put(root_bucket):
    chunks = [b"a" * 70000, b"b" * 3, b"c" * 123456]
    r = root_bucket.put_object("chunked", iter(chunks))
    data = b"".join(chunks)
    assert r.crc == CRC.calc(data)
    assert root_bucket.get_object("chunked").read() == data


@pytest.mark.parametrize("signer", ["v1", "v4"])
def test_weird_keys_round_trip(emulator, root_bucket, signer):
    b = root_bucket if signer == "v1" else v4_bucket(emulator)
    for i, key in enumerate(WEIRD_KEYS):
        data = f"{i}:{key}".encode()
        b.put_object(key, data)
        assert b.get_object(key).read() == data, key
        assert b.head_object(key).content_length == len(data)
    assert sorted(o.key for o in oss2.ObjectIterator(b, max_keys=3)) == sorted(WEIRD_KEYS)
    assert sorted(o.key for o in oss2.ObjectIteratorV2(b, max_keys=4)) == sorted(WEIRD_KEYS)
    top = [o.key for o in oss2.ObjectIterator(b, delimiter="/")]
    assert sorted(top) == sorted([k for k in WEIRD_KEYS if "/" not in k] + ["a/", "dir/", "uni/"])
    assert {o.key for o in oss2.ObjectIterator(b, delimiter="/") if o.is_prefix()} == {"a/", "dir/", "uni/"}
    assert [o.key for o in oss2.ObjectIterator(b, prefix="uni/中文/")] == ["uni/中文/ключ/🙂"]
    # multipart with a weird key
    key = "mp/ü ber+%/?#=.bin"
    up = b.init_multipart_upload(key).upload_id
    p = b.upload_part(key, up, 1, b"z" * 1000)
    assert [u.key for u in oss2.MultipartUploadIterator(b, prefix="mp/")] == [key]
    assert [x.part_number for x in oss2.PartIterator(b, key, up)] == [1]
    b.complete_multipart_upload(key, up, [oss2.models.PartInfo(1, p.etag)])
    assert b.get_object(key).read() == b"z" * 1000
    for k in WEIRD_KEYS + [key]:
        b.delete_object(k)
    assert list(oss2.ObjectIterator(b)) == []


def test_list_paging_and_prefixes(root_bucket):
    keys = [f"p/{i:02d}" for i in range(7)] + [f"p/sub{j}/x" for j in range(3)] + ["q", "r/1"]
    for k in keys:
        root_bucket.put_object(k, b"1")
    page = root_bucket.list_objects(prefix="p/", delimiter="/", max_keys=4)
    assert page.is_truncated and [o.key for o in page.object_list] == ["p/00", "p/01", "p/02", "p/03"]
    seen, marker = [], ""
    while True:
        page = root_bucket.list_objects(prefix="p/", delimiter="/", max_keys=3, marker=marker)
        seen += [o.key for o in page.object_list] + page.prefix_list
        if not page.is_truncated:
            break
        marker = page.next_marker
    assert seen == [f"p/{i:02d}" for i in range(7)] + ["p/sub0/", "p/sub1/", "p/sub2/"]
    seen, token = [], ""
    while True:
        page = root_bucket.list_objects_v2(delimiter="/", max_keys=1, continuation_token=token)
        seen += [o.key for o in page.object_list] + page.prefix_list
        if not page.is_truncated:
            break
        token = page.next_continuation_token
    assert seen == ["p/", "q", "r/"]
    with pytest.raises(oss2.exceptions.InvalidArgument):
        root_bucket.list_objects(max_keys=1001)


def test_invalid_object_names(root_bucket):
    for key in ["/abs", "\\win", "k" * 1024, "é" * 512]:
        with pytest.raises(oss2.exceptions.InvalidObjectName):
            root_bucket.put_object(key, b"x")
    root_bucket.put_object("é" * 511, b"ok")  # 1022 bytes


def test_bad_content_md5(root_bucket):
    with pytest.raises(oss2.exceptions.InvalidDigest) as ei:
        root_bucket.put_object("md5", b"data", headers={"Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg=="})
    assert ei.value.code == "InvalidDigest"
    assert not root_bucket.object_exists("md5")
    good = oss2.utils.content_md5(b"data")
    assert root_bucket.put_object("md5", b"data", headers={"Content-MD5": good}).status == 200


def test_forbid_overwrite(root_bucket):
    h = {"x-oss-forbid-overwrite": "true"}
    root_bucket.put_object("once", b"1", headers=h)
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        root_bucket.put_object("once", b"2", headers=h)
    assert (ei.value.status, ei.value.code) == (409, "FileAlreadyExists")
    assert root_bucket.get_object("once").read() == b"1"
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        root_bucket.init_multipart_upload("once", headers=h)
    assert ei.value.code == "FileAlreadyExists"
    up = root_bucket.init_multipart_upload("later", headers=h).upload_id
    p = root_bucket.upload_part("later", up, 1, b"x")
    root_bucket.put_object("later", b"sneaked in")
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        root_bucket.complete_multipart_upload("later", up, [oss2.models.PartInfo(1, p.etag)], headers=h)
    assert ei.value.code == "FileAlreadyExists"
    root_bucket.put_object("once", b"3")  # without the header it overwrites
    assert root_bucket.get_object("once").read() == b"3"


def test_no_such_bucket_and_request_ids(emulator):
    b = oss2.Bucket(oss2.Auth(emulator.root.id, emulator.root.secret), emulator.oss_url, "nope")
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        b.put_object("k", b"x")
    r = requests.get(f"{emulator.oss_url}/drop/k")
    assert r.status_code == 403 and re.fullmatch(r"[0-9A-F]{24}", r.headers["x-oss-request-id"])
    assert r.text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>')


def test_presigned_urls(emulator, root_bucket):
    root_bucket.put_object("signed/a b", b"payload")
    url = root_bucket.sign_url("GET", "signed/a b", 60)
    assert requests.get(url).content == b"payload"
    assert requests.get(url.replace("Signature=", "Signature=A")).status_code == 403
    put = v4_bucket(emulator).sign_url("PUT", "signed/v4", 60)
    assert requests.put(put, data=b"v4 body").status_code == 200
    assert root_bucket.get_object("signed/v4").read() == b"v4 body"


def test_bucket_info_and_meta(root_bucket):
    info = root_bucket.get_bucket_info()
    assert info.name == "drop" and info.location == "oss-cn-hangzhou"
    root_bucket.put_object("m", b"12345")
    meta = root_bucket.get_object_meta("m")
    assert meta.content_length == 5 and meta.etag


def test_persistence_across_restart(tmp_path):
    from tests.ossemu import Emulator

    with Emulator(str(tmp_path / "d")) as emu:
        b = oss2.Bucket(oss2.Auth(emu.root.id, emu.root.secret), emu.oss_url, "drop")
        b.put_object("keep", b"kept")
        up = b.init_multipart_upload("mp").upload_id
        b.upload_part("mp", up, 1, b"p1")
    with Emulator(str(tmp_path / "d")) as emu:
        b = oss2.Bucket(oss2.Auth(emu.root.id, emu.root.secret), emu.oss_url, "drop")
        assert b.get_object("keep").read() == b"kept"
        assert [p.part_number for p in oss2.PartIterator(b, "mp", up)] == [1]
        assert emu.stats()["uploads_open"] == 1
