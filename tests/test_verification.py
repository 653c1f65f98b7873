"""Verification without CRC64: against a server that omits x-oss-hash-crc64ecma the daemon
verifies by Content-MD5 and ETag, records `md5` per file, and shows it in `status`."""

from __future__ import annotations

import signal

import oss2
import pytest

from tests.helpers import Daemon, MiB, fast_upload, object_bytes, ossyncd, random_file, wait_until

PART = 256 * 1024


@pytest.fixture
def nocrc(tmp_path):
    """An emulator that never sends x-oss-hash-crc64ecma (nor HashCrc64ecma in ListParts)."""
    from tests.ossemu import Emulator

    emu = Emulator(str(tmp_path / "ossemu-data"), buckets=["drop"], min_duration=1, crc64=False)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def _all_md5_and_equal(emu, d: Daemon, files: dict[str, bytes]) -> None:
    rows = {r["key"]: r for r in d.files()}
    for key, data in files.items():
        assert rows[key]["state"] == "done", rows[key]
        assert rows[key]["verification"] == "md5", rows[key]
        assert object_bytes(emu, key) == data, key


def test_emulator_switch_omits_crc64_everywhere(nocrc):
    b = oss2.Bucket(oss2.Auth(nocrc.root.id, nocrc.root.secret), nocrc.oss_url, "drop")
    r = b.put_object("a", b"hello")
    assert r.crc is None and r.etag == "5D41402ABC4B2A76B9719D911017C592"
    up = b.init_multipart_upload("m").upload_id
    p = b.upload_part("m", up, 1, b"x" * 1000)
    assert p.crc is None
    listed = b.list_parts("m", up).parts
    assert [x.part_crc for x in listed] == [None]
    # a body that differs from its Content-MD5 is refused, as OSS does
    with pytest.raises(oss2.exceptions.OssError) as e:
        b.put_object("bad", b"data", headers={"Content-MD5": oss2.utils.content_md5(b"other")})
    assert e.value.code == "InvalidDigest"


@pytest.mark.timeout(120)
def test_fresh_simple_and_multipart_uploads_done_verified_by_md5(tmp_path, nocrc, daemon_factory):
    drop = tmp_path / "drop"
    files = {f"in/{n}": random_file(drop / n, size, seed=i)
             for i, (n, size) in enumerate([("empty", 0), ("small.txt", 1000), ("mid.bin", MiB - 1),
                                            ("big.bin", 3 * MiB + 7), ("exact.bin", 2 * MiB)])}
    d = daemon_factory([{"path": drop, "prefix": "in/"}], emu=nocrc).start()
    d.wait_states({"done": len(files)}, timeout=60)
    _all_md5_and_equal(nocrc, d, files)
    modes = {r["key"]: r["mode"] for r in d.files()}
    assert modes["in/big.bin"] == "multipart" and modes["in/small.txt"] == "simple"
    st = d.status()
    assert st["verification"]["mode"] == "md5", st
    text = ossyncd("status", "-c", d.config)
    assert "verification: MD5" in text.stdout, text.stdout
    # the capability is logged once, not per request
    assert d.output().count("server returns no x-oss-hash-crc64ecma") == 1, d.output()[-2000:]
    assert nocrc.stats()["uploads_open"] == 0
    d.stop()


@pytest.mark.timeout(180)
def test_kill_9_and_resume_without_crc64(tmp_path, nocrc, daemon_factory):
    drop = tmp_path / "drop"
    size = 12 * MiB
    data = random_file(drop / "big.bin", size, seed=5)
    nparts = size // PART
    up = fast_upload(bandwidth_limit="3MiB", parallel_parts=2)
    d = daemon_factory([{"path": drop, "prefix": "in/"}], emu=nocrc, upload=up).start()
    wait_until(lambda: any(len(u["parts"]) >= 8 for u in nocrc.uploads()), 60, what="8 parts on the server")
    d.stop(signal.SIGKILL)
    d.start()
    d.wait_states({"done": 1}, timeout=120)
    _all_md5_and_equal(nocrc, d, {"in/big.bin": data})
    stats = nocrc.stats()
    assert stats["uploads_initiated"] == 1, stats           # resumed, not started over
    assert stats["requests"]["UploadPart"] < nparts + 8, stats
    assert stats["uploads_open"] == 0
    d.stop()


@pytest.mark.timeout(120)
def test_bit_flip_is_refused_and_retried_without_crc64(tmp_path, nocrc, daemon_factory):
    drop = tmp_path / "drop"
    files = {"in/s.bin": random_file(drop / "s.bin", 300_000, seed=1),
             "in/m.bin": random_file(drop / "m.bin", 2 * MiB + 5, seed=2)}
    nocrc.set_faults([{"op": "PutObject", "count": 1, "flip_bit": True},
                      {"op": "UploadPart", "count": 2, "flip_bit": True}])
    d = daemon_factory([{"path": drop, "prefix": "in/"}], emu=nocrc).start()
    d.wait_states({"done": 2}, timeout=60)
    _all_md5_and_equal(nocrc, d, files)
    errors = nocrc.stats()["errors"]
    assert errors["PutObject"]["InvalidDigest"] == 1, errors
    assert errors["UploadPart"]["InvalidDigest"] == 2, errors
    assert not d.files("failed")
    d.stop()
