"""`ossyncd run` as a real subprocess on real folders, against the emulator."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import Daemon, MiB, bucket_keys, events, fast_upload, object_bytes, ossyncd, random_file, wait_until


@pytest.fixture
def drop(tmp_path):
    d = tmp_path / "drop"
    d.mkdir()
    return d


def slow_writer(path: Path, seconds: float, seed: int) -> bytes:
    rng = random.Random(seed)
    data = b""
    with open(path, "wb") as f:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            chunk = rng.randbytes(4096)
            f.write(chunk)
            f.flush()
            data += chunk
            time.sleep(0.25)
    return data


@pytest.mark.timeout(300)
def test_mixed_writers_all_uploaded_once_and_whole(tmp_path, emulator, drop, daemon_factory):
    d = daemon_factory([{"path": str(drop), "prefix": "in/", "settle_seconds": 1.0}]).start()
    src = tmp_path / "src"
    rng = random.Random(500)
    expected: dict[str, bytes] = {}
    sizes = [0, 1] + [rng.randint(0, 64 * 1024) for _ in range(440)] + \
            [rng.randint(64 * 1024, MiB - 1) for _ in range(55)] + [2 * MiB, 5 * MiB + 3, 9 * MiB, 20 * MiB, 3 * MiB + 1, 1 * MiB]
    for i, size in enumerate(sizes):
        sub = "rs" if i % 3 == 0 else "cp"
        expected[f"{sub}/d{i % 7}/f{i}.bin"] = random_file(src / sub / f"d{i % 7}" / f"f{i}.bin", size, seed=i)
    slow = threading.Thread(target=lambda: expected.__setitem__("slow.log", slow_writer(drop / "slow.log", 10, 1)))
    slow.start()
    (drop / "cp").mkdir()
    subprocess.run(f"cp -r {src / 'cp'}/* {drop / 'cp'}/", shell=True, check=True)
    subprocess.run(["rsync", "-a", f"{src / 'rs'}/", f"{drop / 'rs'}/"], check=True)
    slow.join()
    assert len(expected) >= 500 and sum(1 for s in sizes if s >= MiB) >= 5
    d.wait_states({"done": len(expected), "failed": 0}, 240)
    keys = bucket_keys(emulator)
    assert keys == sorted("in/" + k for k in expected)          # no temp names, nothing extra
    for k, data in expected.items():
        assert object_bytes(emulator, "in/" + k) == data, k
    stats = emulator.stats()["requests"]
    # each file became an object exactly once: no partial version of the slow file was ever written
    assert stats.get("PutObject", 0) + stats.get("CompleteMultipartUpload", 0) == len(expected)
    assert d.stop() == 0


@pytest.mark.timeout(300)
def test_kill_9_then_files_added_while_down(tmp_path, emulator, drop, daemon_factory):
    # a kill between InitiateMultipartUpload and recording its id leaves an upload state
    # never owned: the orphan sweep (age 0 here) must clean it up after the restart
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.5}],
                       upload=fast_upload(part_size="1MiB", multipart_threshold=1 * MiB),
                       daemon={"rescan_interval": 5.0, "orphan_max_age": 0, "orphan_sweep_interval": 1.0})
    expected = {f"big{i}.bin": random_file(drop / f"big{i}.bin", 12 * MiB, seed=i) for i in range(3)}
    expected.update({f"s{i}.txt": random_file(drop / f"s{i}.txt", 1000 + i, seed=100 + i) for i in range(20)})
    emulator.set_faults([{"op": "UploadPart", "delay_ms": 40}])
    d.start()
    wait_until(lambda: emulator.stats()["bytes_received"] >= 10 * MiB, 60, what="uploads under way")
    d.proc.kill()
    d.proc.wait()
    d.log.close()
    emulator.clear_faults()
    expected.update({f"late{i}.txt": random_file(drop / f"late{i}.txt", 500 + i, seed=200 + i) for i in range(5)})
    total = sum(len(v) for v in expected.values())
    d.start()
    d.wait_states({"done": len(expected)}, 180)
    for k, data in expected.items():
        assert object_bytes(emulator, k) == data, k
    stats = emulator.stats()
    # nothing re-sent beyond the parts in flight at the kill (4 parallel parts of 1 MiB)
    assert stats["bytes_received"] <= total + 4 * MiB, stats
    wait_until(lambda: emulator.stats()["uploads_open"] == 0, 10, what="no open uploads left")
    assert d.stop() == 0


@pytest.mark.timeout(180)
def test_modified_file_reuploaded_unchanged_never_resent(tmp_path, emulator, drop, daemon_factory):
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}])
    random_file(drop / "a.txt", 5000, seed=1)
    random_file(drop / "b.txt", 7000, seed=2)
    d.start()
    d.wait_states({"done": 2}, 60)
    assert d.stop() == 0
    puts = emulator.stats()["requests"]["PutObject"]
    # restart twice: the startup scans must not send anything
    for _ in range(2):
        scans = len(events(d, "rescan"))
        d.start()
        wait_until(lambda: len(events(d, "rescan")) > scans, 60, what="the start-up rescan")
        assert d.stop() == 0
    assert emulator.stats()["requests"]["PutObject"] == puts
    d.start()
    new = random_file(drop / "a.txt", 6000, seed=3)
    wait_until(lambda: object_bytes(emulator, "a.txt") == new, 60, interval=0.3, what="re-upload")
    assert emulator.stats()["requests"]["PutObject"] == puts + 1
    assert d.stop() == 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("action", ["delete", "move"])
def test_after_upload_only_after_verified(tmp_path, emulator, drop, daemon_factory, action):
    done_dir = tmp_path / "done"
    w = {"path": str(drop), "prefix": "", "settle_seconds": 0.3, "after_upload": action}
    if action == "move":
        w["move_to"] = str(done_dir)
    d = daemon_factory([w])
    # Complete fails permanently for the big file: its source must stay
    emulator.set_faults([{"op": "CompleteMultipartUpload", "status": 400, "code": "InvalidArgument",
                          "key_prefix": "big"}])
    big = random_file(drop / "big.bin", 2 * MiB, seed=1)
    small = random_file(drop / "sub" / "small.txt", 100, seed=2)
    d.start()
    d.wait_states({"done": 1, "failed": 1}, 60)
    assert object_bytes(emulator, "sub/small.txt") == small
    assert not (drop / "sub" / "small.txt").exists()
    if action == "move":
        assert (done_dir / "sub" / "small.txt").read_bytes() == small
    assert (drop / "big.bin").read_bytes() == big        # never verified: kept in place
    failed = d.files("failed")[0]
    assert "InvalidArgument" in failed["error"]
    emulator.clear_faults()
    assert ossyncd("retry", "-c", d.config).returncode == 0
    d.wait_states({"done": 2}, 60)
    assert object_bytes(emulator, "big.bin") == big
    wait_until(lambda: not (drop / "big.bin").exists(), 10, what="source handled after upload")
    assert d.stop() == 0


@pytest.mark.timeout(180)
def test_bad_inputs_reported_daemon_carries_on(tmp_path, emulator, drop, daemon_factory):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret outside the root")
    os.mkfifo(drop / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(drop / "sock"))
    os.symlink(outside, drop / "link-out")
    os.symlink(drop / "loop-b", drop / "loop-a")
    os.symlink(drop / "loop-a", drop / "loop-b")
    os.mknod(drop / "dev", 0o600 | 0o020000, os.makedev(1, 3))     # a character device node
    (drop / os.fsdecode(b"bad-\xff-name.txt")).write_bytes(b"x")
    deep = drop.joinpath(*(c * 200 for c in "defghi"))      # key of 1,200+ bytes
    deep.mkdir(parents=True)
    (deep / "long.txt").write_text("too long a key")
    good = random_file(drop / "good.txt", 1234, seed=1)
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}]).start()
    d.wait_states({"done": 1}, 60)
    wait_until(lambda: d.status()["counts"]["skipped"] >= 8, 30, what="skipped entries")
    skipped = {Path(f["path"]).name: f["error"] for f in d.files("skipped")}
    assert "FIFO" in skipped["pipe"]
    assert "socket" in skipped["sock"]
    assert "device" in skipped["dev"]
    assert "symlink" in skipped["link-out"]
    assert "symlink" in skipped["loop-a"] and "symlink" in skipped["loop-b"]
    assert any("UTF-8" in e for n, e in skipped.items() if n.startswith("bad-"))
    assert "1023" in skipped["long.txt"]
    assert object_bytes(emulator, "good.txt") == good
    assert bucket_keys(emulator) == ["good.txt"]
    assert d.proc.poll() is None
    sock.close()
    assert d.stop() == 0


@pytest.mark.timeout(180)
def test_unreadable_file_as_unprivileged_daemon(emulator, unprivileged):
    base = unprivileged.workdir()          # root reads mode-000 files: the daemon runs as nobody
    drop = base / "drop"
    drop.mkdir()
    os.chmod(drop, 0o777)
    secret = drop / "secret.bin"
    secret.write_bytes(b"x" * 100)
    os.chmod(secret, 0)
    good = random_file(drop / "good.bin", 100, seed=1)
    os.chmod(drop / "good.bin", 0o644)
    d = Daemon(base, emulator, [{"path": str(drop), "prefix": "", "settle_seconds": 0.3}], upload=fast_upload())
    os.chown(d.config, 65534, 65534)
    d.log = open(d.log_path, "ab")
    d.proc = subprocess.Popen(unprivileged.cmd("-m", "ossyncd", "run", "-c", d.config), stdout=d.log,
                              stderr=subprocess.STDOUT, cwd="/", env=unprivileged.env(NO_PROXY="127.0.0.1"))
    try:
        d.wait_states({"done": 1, "failed": 1}, 60)
        failed = d.files("failed")[0]
        assert failed["path"].endswith("secret.bin") and "Permission denied" in failed["error"]
        assert object_bytes(emulator, "good.bin") == good
    finally:
        assert d.stop() == 0


@pytest.mark.timeout(180)
def test_status_shows_live_progress_then_url(tmp_path, emulator, drop, daemon_factory):
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}],
                       upload=fast_upload(parallel_parts=1))
    emulator.set_faults([{"op": "UploadPart", "delay_ms": 400}])   # 24 parts: ~10 s
    data = random_file(drop / "big.bin", 6 * MiB, seed=4)
    d.start()
    seen = []

    def progressed():
        fl = d.status()["in_flight"]
        if fl:
            assert fl[0]["bytes_total"] == len(data)
            seen.append(fl[0]["bytes_done"])
        return len(set(seen)) >= 3
    wait_until(progressed, 60, interval=0.3, what=f"bytes_done increasing (seen {seen})")
    assert seen == sorted(seen) and seen[-1] > seen[0]
    emulator.clear_faults()
    d.wait_states({"done": 1}, 60)
    row = d.files("done")[0]
    assert row["url"].endswith("/drop/big.bin") and row["crc64"]
    st = d.status()
    assert st["daemon"]["running"] and st["counts"]["done"] == 1
    assert st["credentials"]["source"] == "sts" and st["credentials"]["expires_at"]
    assert d.stop() == 0
    assert ossyncd("status", "-c", d.config, "--json").returncode == 0


@pytest.mark.timeout(300)
def test_event_storm_5000_files(tmp_path, emulator, drop, daemon_factory):
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.5}],
                       upload=fast_upload(max_files_in_flight=8)).start()
    time.sleep(1)
    for i in range(5000):
        (drop / f"d{i % 50}").mkdir(exist_ok=True)
        (drop / f"d{i % 50}" / f"f{i}.txt").write_bytes(b"%d" % i)
    d.wait_states({"done": 5000}, 240)
    assert len(bucket_keys(emulator)) == 5000
    assert d.stop() == 0


@pytest.mark.timeout(60)
def test_second_daemon_refused(tmp_path, emulator, drop, daemon_factory):
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}]).start()
    wait_until(lambda: d.status()["daemon"]["running"], 30, what="daemon running")
    r = ossyncd("run", "-c", d.config, timeout=30)
    assert r.returncode == 1
    assert "in use by another ossyncd" in r.stderr
    assert d.stop() == 0
