"""Emulator: fault injection, control endpoints and CRC64 integrity through the real clients."""

import os
import time

import anycrc
import oss2
import pytest
import requests
from aliyunsdkcore.acs_exception.exceptions import ClientException, ServerException

pytestmark = pytest.mark.timeout(60)
CRC = anycrc.Model("CRC64-XZ")
PART = 100 * 1024


def test_crc_on_every_write(root_bucket, emulator):
    for size in (0, 1, 4097, 300_000):
        data = os.urandom(size)
        r = root_bucket.put_object(f"crc/{size}", data)  # oss2 compares its own CRC with the header
        assert r.crc == CRC.calc(data)
        assert root_bucket.head_object(f"crc/{size}").server_crc == CRC.calc(data)
    objs = {o["key"]: o for o in requests.get(f"{emulator.oss_url}/-/objects").json()}
    assert objs["crc/4097"]["crc64"] == root_bucket.head_object("crc/4097").server_crc


def test_status_fault_with_count(root_bucket, emulator):
    rules = [{"op": "PutObject", "status": 503, "code": "ServiceUnavailable", "count": 2}]
    r = requests.post(f"{emulator.oss_url}/-/faults", json=rules)
    assert r.status_code == 200 and r.json()[0]["remaining"] == 2
    for _ in range(2):
        with pytest.raises(oss2.exceptions.ServerError) as ei:
            root_bucket.put_object("f", b"x" * 200_000)
        assert (ei.value.status, ei.value.code) == (503, "ServiceUnavailable")
    assert requests.get(f"{emulator.oss_url}/-/faults").json()[0]["remaining"] == 0
    assert root_bucket.put_object("f", b"ok").status == 200  # keep-alive connection still usable
    s = emulator.stats()
    assert s["errors"]["PutObject"]["ServiceUnavailable"] == 2 and s["bytes_received"] == 400_002
    assert requests.delete(f"{emulator.oss_url}/-/faults").json() == []
    assert requests.post(f"{emulator.oss_url}/-/faults", json=[{"op": "PutObject"}]).status_code == 400


def test_delay_fault(root_bucket, emulator):
    emulator.set_faults([{"op": "HeadObject", "delay_ms": 400, "count": 1}])
    root_bucket.put_object("d", b"x")
    t0 = time.monotonic()
    root_bucket.head_object("d")
    assert time.monotonic() - t0 >= 0.4
    t0 = time.monotonic()
    root_bucket.head_object("d")
    assert time.monotonic() - t0 < 0.4


def test_reset_after_bytes(root_bucket, emulator):
    emulator.set_faults([{"op": "PutObject", "reset_after_bytes": 65536, "count": 1}])
    with pytest.raises(oss2.exceptions.RequestError):
        root_bucket.put_object("reset", os.urandom(1 << 20))
    s = emulator.stats()
    assert s["bytes_received"] == 65536 and s["errors"]["PutObject"]["ConnectionReset"] == 1
    assert not root_bucket.object_exists("reset")
    assert root_bucket.put_object("reset", b"fine").status == 200
    emulator.reset_stats()
    emulator.set_faults([{"op": "PutObject", "reset_after_bytes": 9 << 20, "count": 1}])  # threaded hashing path
    with pytest.raises(oss2.exceptions.RequestError):
        root_bucket.put_object("reset", os.urandom(12 << 20))
    assert emulator.stats()["bytes_received"] == 9 << 20
    assert root_bucket.get_object("reset").read() == b"fine"
    emulator.set_faults([{"op": "GetObject", "reset_after_bytes": 0, "count": 1}])
    with pytest.raises(oss2.exceptions.RequestError):
        root_bucket.get_object("reset").read()


def test_drop_response_performs_the_operation_then_closes(root_bucket, emulator):
    emulator.set_faults([{"op": "CompleteMultipartUpload", "drop_response": True, "count": 1}])
    up = root_bucket.init_multipart_upload("dropped").upload_id
    p = root_bucket.upload_part("dropped", up, 1, b"d" * 1000)
    with pytest.raises(oss2.exceptions.RequestError):
        root_bucket.complete_multipart_upload("dropped", up, [oss2.models.PartInfo(1, p.etag)])
    assert root_bucket.get_object("dropped").read() == b"d" * 1000   # completed, only the answer was lost
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        root_bucket.complete_multipart_upload("dropped", up, [oss2.models.PartInfo(1, p.etag)])


def test_flip_bit(root_bucket, emulator):
    data = os.urandom(200_000)
    emulator.set_faults([{"op": "PutObject", "flip_bit": True, "count": 1}])
    with pytest.raises(oss2.exceptions.InconsistentError):
        root_bucket.put_object("flip", data)
    stored = root_bucket.get_object("flip").read()
    assert stored != data and len(stored) == len(data)
    assert sum(bin(a ^ b).count("1") for a, b in zip(stored, data)) == 1
    assert root_bucket.head_object("flip").server_crc == CRC.calc(stored)

    emulator.set_faults([{"op": "UploadPart", "flip_bit": True, "count": 1, "flip_offset": 5}])
    up = root_bucket.init_multipart_upload("flip-mp").upload_id
    with pytest.raises(oss2.exceptions.InconsistentError):
        root_bucket.upload_part("flip-mp", up, 1, data)
    assert root_bucket.upload_part("flip-mp", up, 1, data).crc == CRC.calc(data)  # retry is clean


def test_probability_is_seeded(root_bucket, emulator):
    def run():
        emulator.set_faults([{"op": "PutObject", "probability": 0.5, "seed": 42, "status": 500,
                              "code": "InternalError"}])
        out = []
        for i in range(20):
            try:
                root_bucket.put_object("p", b"x")
                out.append(True)
            except oss2.exceptions.ServerError as e:
                assert e.status == 500
                out.append(False)
        return out

    first, second = run(), run()
    assert first == second and 3 < first.count(False) < 17


def test_key_prefix_and_skip(root_bucket, emulator):
    emulator.set_faults([{"op": "*", "key_prefix": "flaky/", "status": 500, "code": "InternalError"}])
    assert root_bucket.put_object("solid/a", b"x").status == 200
    with pytest.raises(oss2.exceptions.ServerError):
        root_bucket.put_object("flaky/a", b"x")
    with pytest.raises(oss2.exceptions.ServerError):
        root_bucket.init_multipart_upload("flaky/b")
    emulator.set_faults([{"op": "PutObject", "skip": 1, "count": 1, "status": 500}], append=False)
    root_bucket.put_object("s", b"1")
    with pytest.raises(oss2.exceptions.ServerError):
        root_bucket.put_object("s", b"2")
    root_bucket.put_object("s", b"3")


def test_assume_role_faults(emulator, sts_credentials):
    emulator.set_faults([{"op": "AssumeRole", "status": 503, "code": "ServiceUnavailable", "count": 1}])
    with pytest.raises(ServerException) as ei:
        sts_credentials()
    assert (ei.value.get_http_status(), ei.value.get_error_code()) == (503, "ServiceUnavailable")
    emulator.set_faults([{"op": "AssumeRole", "reset_after_bytes": 0, "count": 1}])
    with pytest.raises(ClientException) as ei:
        sts_credentials()
    assert ei.value.get_error_code() == "SDK.HttpError"
    emulator.set_faults([{"op": "AssumeRole", "delay_ms": 300, "count": 1}])
    t0 = time.monotonic()
    assert sts_credentials()["AccessKeyId"]
    assert time.monotonic() - t0 >= 0.3
    s = emulator.stats()
    assert s["sts_issued"] == 1 and s["requests"]["AssumeRole"] == 3 and s["faults"]["AssumeRole"] == 3


def test_control_endpoints(root_bucket, emulator):
    up = root_bucket.init_multipart_upload("u").upload_id
    root_bucket.upload_part("u", up, 1, b"abc")
    uploads = requests.get(f"{emulator.oss_url}/-/uploads").json()
    assert uploads[0]["upload_id"] == up and uploads[0]["parts"][0]["size"] == 3
    s = requests.get(f"{emulator.oss_url}/-/stats").json()
    assert s["uploads_open"] == 1 and s["requests"]["UploadPart"] == 1 and s["bytes_received"] == 3
    s = requests.post(f"{emulator.oss_url}/-/stats/reset").json()
    assert s["requests"] == {} and s["bytes_received"] == 0 and s["uploads_open"] == 1
    assert requests.get(f"{emulator.oss_url}/-/info").json() == emulator.info()


def test_retry_after_and_unparsable_error_bodies(root_bucket, emulator):
    emulator.set_faults([{"op": "PutObject", "status": 429, "code": "Throttling", "retry_after": 3, "count": 1},
                         {"op": "PutObject", "status": 503, "bad_error_body": True, "count": 1}])
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        root_bucket.put_object("ra", b"x")
    assert (ei.value.status, ei.value.code) == (429, "Throttling")
    assert ei.value.headers["Retry-After"] == "3"
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        root_bucket.put_object("ra", b"x")
    assert ei.value.status == 503 and not ei.value.code   # nothing to parse a code from
    assert root_bucket.put_object("ra", b"x").status == 200
    for bad in ({"op": "PutObject", "retry_after": 1}, {"op": "PutObject", "bad_error_body": True},
                {"op": "PutObject", "crc64": "bogus"}, {"op": "PutObject", "truncate_body": -1}):
        assert requests.post(f"{emulator.oss_url}/-/faults", json=[bad]).status_code == 400, bad


def test_truncated_response_body(root_bucket, emulator):
    emulator.set_faults([{"op": "InitiateMultipartUpload", "truncate_body": 20, "count": 1},
                         {"op": "GetObject", "truncate_body": 5, "count": 1}])
    with pytest.raises(requests.exceptions.ChunkedEncodingError):   # oss2 lets it through while parsing
        root_bucket.init_multipart_upload("t")
    assert emulator.stats()["errors"]["InitiateMultipartUpload"]["TruncatedResponse"] == 1
    assert emulator.stats()["uploads_open"] == 1   # performed; only the answer was cut
    root_bucket.put_object("t", b"0123456789")
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        root_bucket.get_object("t").read()
    assert root_bucket.get_object("t").read() == b"0123456789"


def test_wrong_and_missing_crc64(emulator):
    crc_bucket = oss2.Bucket(oss2.Auth(emulator.root.id, emulator.root.secret), emulator.oss_url, "drop",
                             enable_crc=True)
    emulator.set_faults([{"op": "PutObject", "crc64": "wrong", "count": 1},
                         {"op": "PutObject", "crc64": "missing", "count": 1}])
    with pytest.raises(oss2.exceptions.InconsistentError):
        crc_bucket.put_object("c", b"abc")
    r = crc_bucket.put_object("c", b"abc")
    assert r.crc is None and "x-oss-hash-crc64ecma" not in r.headers
    assert crc_bucket.put_object("c", b"abc").crc == CRC.calc(b"abc")
    up = crc_bucket.init_multipart_upload("m").upload_id
    p = crc_bucket.upload_part("m", up, 1, b"p" * 1000)
    emulator.set_faults([{"op": "CompleteMultipartUpload", "crc64": "wrong", "count": 1}])
    r = oss2.Bucket(oss2.Auth(emulator.root.id, emulator.root.secret), emulator.oss_url, "drop").complete_multipart_upload(
        "m", up, [oss2.models.PartInfo(1, p.etag)])
    assert r.crc == (CRC.calc(b"p" * 1000) + 1) % (1 << 64)


def test_refuse_performs_nothing(root_bucket, emulator):
    emulator.set_faults([{"op": "InitiateMultipartUpload", "refuse": True, "count": 1},
                         {"op": "PutObject", "refuse": True, "count": 1}])
    with pytest.raises(oss2.exceptions.RequestError):
        root_bucket.init_multipart_upload("r")
    with pytest.raises(oss2.exceptions.RequestError):
        root_bucket.put_object("r", b"")
    s = emulator.stats()
    assert s["uploads_open"] == 0 and not root_bucket.object_exists("r") and s["bytes_received"] == 0
