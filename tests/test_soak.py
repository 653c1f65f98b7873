"""Long reliability runs (`make soak`, not in `make test`): the daemon killed with -9 over
and over while OSS misbehaves, files keep arriving, and tokens keep expiring. At the end
every file is `done`, byte-equal in the bucket, and no multipart upload is left open."""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.helpers import MiB, bucket_keys, fast_upload, object_bytes, random_file, wait_until

pytestmark = pytest.mark.soak

SEED = int(os.environ.get("OSSYNCD_SOAK_SEED", "20261128"))
CYCLES = int(os.environ.get("OSSYNCD_SOAK_CYCLES", "60"))


@pytest.mark.timeout(1800)
def test_kill_9_loop_with_faults_and_expiring_tokens(tmp_path, emulator, daemon_factory):
    print(f"soak seed {SEED} (set OSSYNCD_SOAK_SEED to replay), {CYCLES} cycles")
    rng = random.Random(SEED)
    drop = tmp_path / "drop"
    drop.mkdir()
    d = daemon_factory([{"path": str(drop), "prefix": "soak/", "settle_seconds": 0.5}],
                       upload=fast_upload(part_size="256KiB", request_retries=8),
                       daemon={"rescan_interval": 3.0, "orphan_max_age": 0, "orphan_sweep_interval": 2.0})
    emulator.set_faults([
        {"op": "UploadPart", "probability": 0.1, "status": 503, "code": "ServiceUnavailable", "seed": SEED},
        {"op": "UploadPart", "probability": 0.03, "reset_after_bytes": 65536, "seed": SEED + 1},
        {"op": "PutObject", "probability": 0.05, "status": 500, "code": "InternalError", "seed": SEED + 2},
        {"op": "UploadPart", "delay_ms": 20},
    ])
    expected: dict[str, bytes] = {}
    n = 0
    for cycle in range(CYCLES):
        for _ in range(rng.randint(3, 12)):
            size = rng.choice([0, rng.randint(1, 200_000), rng.randint(1 * MiB, 6 * MiB)])
            name = f"c{cycle}/f{n}.bin"
            expected[name] = random_file(drop / name, size, seed=SEED + n)
            n += 1
        if rng.random() < 0.3 and expected:          # an existing file is rewritten
            name = rng.choice(sorted(expected))
            expected[name] = random_file(drop / name, rng.randint(0, 3 * MiB), seed=SEED + 10_000 + n)
            n += 1
        d.start()
        time.sleep(rng.uniform(0.5, 3.0))
        if rng.random() < 0.3:
            emulator.expire_tokens()
            time.sleep(rng.uniform(0.2, 1.0))
        d.proc.kill()
        d.proc.wait()
        d.log.close()
    emulator.clear_faults()
    d.start()
    d.wait_states({"done": len(expected), "failed": 0}, 600)
    for name, data in expected.items():
        assert object_bytes(emulator, "soak/" + name) == data, f"{name} (seed {SEED})"
    assert bucket_keys(emulator) == sorted("soak/" + k for k in expected)
    wait_until(lambda: emulator.stats()["uploads_open"] == 0, 30, what="orphan uploads swept")
    assert d.stop() == 0
