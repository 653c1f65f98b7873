"""The fault soak of issue 9 (in `make test`): 200 small files, simple and multipart, while
OSS resets bodies mid-way, answers 5xx, flips bits in PutObject and UploadPart bodies and
stalls past the read timeout. Every file ends `done` and byte-equal, none is ever `failed`,
and no multipart upload is left open once the sweep has run."""

from __future__ import annotations

import random

import pytest

from tests.helpers import events, fast_upload, object_bytes, random_file, wait_until

KiB = 1024
FILES = 200
MULTIPART = 30
WRITE_OPS = ("PutObject", "UploadPart", "InitiateMultipartUpload", "CompleteMultipartUpload")


def _faults() -> list[dict]:
    rules = [{"op": "PutObject", "probability": 0.05, "flip_bit": True, "seed": 1},
             {"op": "UploadPart", "probability": 0.05, "flip_bit": True, "seed": 2},
             {"op": "PutObject", "probability": 0.04, "reset_after_bytes": 8 * KiB, "seed": 3},
             {"op": "UploadPart", "probability": 0.04, "reset_after_bytes": 40 * KiB, "seed": 4}]
    for i, op in enumerate(WRITE_OPS):
        rules.append({"op": op, "probability": 0.04, "status": 503, "seed": 10 + i})
        # after the operation was performed: the response comes too late, as after a lost one
        rules.append({"op": op, "probability": 0.02, "delay_ms": 1500, "seed": 20 + i})
    return rules


@pytest.mark.timeout(180)
def test_fault_soak_200_files(tmp_path, emulator, daemon_factory):
    rng = random.Random(9)
    drop = tmp_path / "drop"
    files = {}
    for i in range(FILES):
        size = rng.randint(300 * KiB, 560 * KiB) if i < MULTIPART else rng.randint(0, 48 * KiB)
        files[f"soak/f{i:03d}"] = random_file(drop / f"f{i:03d}", size, seed=i)
    emulator.set_faults(_faults())
    d = daemon_factory([{"path": drop, "prefix": "soak/"}],
                       oss={"read_timeout": 1.0},
                       upload=fast_upload(multipart_threshold="300KiB", part_size="100KiB", request_retries=10,
                                          max_files_in_flight=8, file_retry_delay=0.5, file_retry_delay_max=1.0),
                       daemon={"rescan_interval": 30.0, "orphan_max_age": 0, "orphan_sweep_interval": 3.0,
                               "log_level": "debug"}).start()   # request retries are debug lines

    def all_done():
        counts = d.status()["counts"]
        assert counts["failed"] == 0, d.files("failed")
        assert d.proc.poll() is None, d.output()[-3000:]
        return counts["done"] == FILES
    wait_until(all_done, 150, interval=0.5, what=f"{FILES} files done (log: {d.log_path})")
    emulator.clear_faults()
    rows = {r["key"]: r for r in d.files()}
    assert all(r["state"] == "done" and r["verification"] == "crc64" for r in rows.values())
    assert sum(r["mode"] == "multipart" for r in rows.values()) == MULTIPART
    for key, data in files.items():
        assert object_bytes(emulator, key) == data, key
    wait_until(lambda: emulator.stats()["uploads_open"] == 0, 20, what="no open uploads after the sweep")
    stats = emulator.stats()
    # every kind of fault fired, and a corrupted body was never kept: a flipped PutObject body is
    # refused by the server for its Content-MD5, a flipped part (sent without one to a CRC64
    # server) is caught by the CRC64 check and re-sent
    assert stats["errors"]["PutObject"]["InvalidDigest"], stats
    assert any(e.get("op") == "UploadPart" and "CRC64 mismatch" in e.get("error", "")
               for e in events(d, "retrying")), f"no UploadPart CRC64 mismatch caught (log: {d.log_path})"
    assert all(stats["faults"].get(op) for op in WRITE_OPS), stats["faults"]
    d.stop()
