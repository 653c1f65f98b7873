"""Operator controls on a running daemon: SIGHUP reload, pause/resume, retry PATH, the orphan
sweep and the Prometheus endpoint."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ossyncd.model import Identity
from tests.helpers import (
    MiB,
    bucket_keys,
    events,
    fast_upload,
    object_bytes,
    ossyncd,
    random_file,
    root_bucket,
    scrape,
    wait_until,
    write_config,
)
from tests.test_systemd import NotifySocket

# ------------------------------------------------------------------------ SIGHUP

@pytest.mark.timeout(60)
def test_sighup_swaps_watch_folders(tmp_path, emulator, daemon_factory, monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    daemon_cfg = {"rescan_interval": 2.0}
    d = daemon_factory([{"path": str(old), "prefix": "old/", "settle_seconds": 0.3}], daemon=daemon_cfg)
    notify = NotifySocket()
    try:
        d.start(env=notify.env(None))
        notify.wait_ready(d)
        a = random_file(old / "a.txt", 100, seed=1)
        d.wait_states({"done": 1}, 30)
        assert object_bytes(emulator, "old/a.txt") == a

        write_config(d.config, emulator, state=tmp_path / "state.db", upload=fast_upload(), daemon=daemon_cfg,
                     watches=[{"path": str(new), "prefix": "new/", "settle_seconds": 0.3}])
        t_hup = time.monotonic()
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: events(d, "config reloaded"), 10, what="config reloaded")
        reloading = notify.wait_for("RELOADING=1", 5, since=t_hup)
        assert notify.wait_for("READY=1", 5, since=reloading) >= reloading
        assert any(m.startswith("MONOTONIC_USEC=") for _, m in notify.lines(since=t_hup))

        b = random_file(new / "b.txt", 200, seed=2)
        d.wait_states({"done": 2}, 30)
        assert object_bytes(emulator, "new/b.txt") == b
        random_file(old / "c.txt", 300, seed=3)
        time.sleep(4.5)          # > settle + rescan_interval: neither inotify nor a rescan sees it
        assert bucket_keys(emulator) == ["new/b.txt", "old/a.txt"]
        assert not any(f["path"].endswith("c.txt") for f in d.files())
        assert d.stop() == 0
    finally:
        notify.close()


@pytest.mark.timeout(60)
def test_sighup_with_broken_config_keeps_the_running_one(tmp_path, emulator, daemon_factory):
    drop = tmp_path / "drop"
    drop.mkdir()
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}])
    d.start()
    wait_until(lambda: events(d, "started"), 30, what="daemon started")
    good = d.config.read_text()
    d.config.write_text(good.replace(f'path = "{drop}"', f'path = "{tmp_path / "missing"}"'))
    d.proc.send_signal(signal.SIGHUP)
    rejected = wait_until(lambda: events(d, "reload rejected; the running config stays in force"), 10,
                          what="reload rejected log line")
    assert rejected[0]["level"] == "error"
    assert rejected[0]["error"].startswith("watch[0].path:") and "missing" in rejected[0]["error"]
    # still running, on the old config (the CLI cannot read the broken file: check the bucket)
    data = random_file(drop / "still.txt", 500, seed=4)
    wait_until(lambda: bucket_keys(emulator) == ["still.txt"], 30, interval=0.2, what="upload after rejection")
    assert object_bytes(emulator, "still.txt") == data
    # a TOML syntax error is rejected the same way
    d.config.write_text("[oss\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(events(d, "reload rejected; the running config stays in force")) == 2, 10,
               what="second rejection")
    assert "not valid TOML" in events(d, "reload rejected; the running config stays in force")[1]["error"]
    assert d.proc.poll() is None and not events(d, "config reloaded")
    assert d.stop() == 0


@pytest.mark.timeout(90)
def test_sighup_with_fixed_credentials_resumes_uploads_without_restart(tmp_path, emulator, daemon_factory):
    from tests.helpers import sts_credentials
    drop = tmp_path / "drop"
    drop.mkdir()
    wrong = sts_credentials(emulator, access_key_secret="not-the-secret", retry_backoff=0.2, retry_backoff_max=0.5)
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}], credentials=wrong)
    data = random_file(drop / "waiting.txt", 700, seed=5)
    d.start()
    wait_until(lambda: d.status()["credentials"]["error"], 30, interval=0.3, what="credential error in status")
    assert "InvalidAccessKeySecret" in d.status()["credentials"]["error"]
    assert all(f["state"] != "failed" for f in d.files())         # waiting, not failed
    pid = d.proc.pid
    d.config.write_text(d.config.read_text().replace('"not-the-secret"',
                                                     '"' + emulator.info()["user"]["secret"] + '"'))
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: events(d, "credentials replaced"), 10, what="credentials replaced")
    d.wait_states({"done": 1}, 30)
    assert object_bytes(emulator, "waiting.txt") == data
    assert d.proc.pid == pid and d.status()["credentials"]["error"] is None
    assert d.stop() == 0


# ------------------------------------------------------------------------ pause / resume

@pytest.mark.timeout(90)
def test_pause_stops_parts_within_2s_and_resume_finishes_without_resending(tmp_path, emulator, daemon_factory):
    drop = tmp_path / "drop"
    drop.mkdir()
    part, parallel = 1 * MiB, 2
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}],
                upload=fast_upload(part_size="1MiB", multipart_threshold=8 * MiB, parallel_parts=parallel))
    emulator.set_faults([{"op": "UploadPart", "delay_ms": 100}])
    data = random_file(drop / "big.bin", 64 * MiB, seed=5)
    parts = lambda: emulator.stats()["requests"].get("UploadPart", 0)
    d.start()
    wait_until(lambda: parts() >= 4, 30, what="upload under way")
    # sample (time, UploadPart requests so far, pause recorded in the state DB) every 20 ms
    samples: list[tuple[float, int, bool]] = []
    done = threading.Event()

    def sample():
        db = sqlite3.connect(f"file:{tmp_path / 'state.db'}?mode=ro", uri=True, timeout=5)
        while not done.is_set():
            paused = db.execute("SELECT value FROM meta WHERE name='paused'").fetchone() is not None
            samples.append((time.monotonic(), parts(), paused))
            time.sleep(0.02)
        db.close()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    r = ossyncd("pause", "-c", d.config)
    assert r.returncode == 0 and "paused" in r.stdout, r.stderr
    # until the counter has been flat for 5 s
    wait_until(lambda: samples and samples[-1][2] and
               time.monotonic() - min(t for t, n, _ in samples if n == samples[-1][1]) >= 5.0, 20,
               what="UploadPart requests to stop")
    done.set()
    sampler.join()
    t_written = min(t for t, _, p in samples if p)
    last = samples[-1][1]
    t_last = min(t for t, n, _ in samples if n == last)
    latency = t_last - t_written
    print(f"pause: last UploadPart request {latency:+.2f} s after the pause was recorded; "
          f"{last} of 64 parts requested")
    assert latency <= 2.0
    assert last < 64 and emulator.stats()["requests"].get("CompleteMultipartUpload", 0) == 0
    st = d.status()
    assert st["daemon"]["paused"] is True and st["daemon"]["running"] is True
    assert st["counts"]["queued"] == 1 and st["in_flight"] == []

    emulator.clear_faults()
    r = ossyncd("resume", "-c", d.config)
    assert r.returncode == 0 and "resumed" in r.stdout
    d.wait_states({"done": 1}, 60)
    assert object_bytes(emulator, "big.bin") == data
    sent = emulator.stats()["bytes_received_by_op"]["UploadPart"]
    print(f"UploadPart bytes: {sent} for {len(data)} (+{sent - len(data)})")
    assert sent <= len(data) + parallel * part
    assert d.status()["daemon"]["paused"] is False
    assert d.stop() == 0


# ------------------------------------------------------------------------ retry PATH

@pytest.mark.timeout(30)
def test_retry_path_requeues_only_that_file(tmp_path, emulator):
    from ossyncd.state import State
    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = write_config(tmp_path / "c.toml", emulator, state=tmp_path / "state.db",
                       watches=[{"path": str(drop), "prefix": ""}])
    st = State(tmp_path / "state.db")
    for name in ("a.txt", "b.txt"):
        row, _ = st.observe(str(drop / name), str(drop), name, Identity(1, 1, 1))
        st.transition(row.id, "failed", error="AccessDenied", count_attempt=True)
    st.close()
    r = ossyncd("retry", "-c", cfg, drop / "a.txt")
    assert r.returncode == 0 and r.stdout.strip() == "1 file(s) queued again", r.stdout + r.stderr
    states = {Path(f["path"]).name: (f["state"], f["attempts"], f["error"])
              for f in json.loads(ossyncd("list", "-c", cfg, "--json").stdout)}
    assert states == {"a.txt": ("queued", 0, None), "b.txt": ("failed", 1, "AccessDenied")}
    assert ossyncd("retry", "-c", cfg, drop / "nothing.txt").stdout.strip() == "0 file(s) queued again"


# ------------------------------------------------------------------------ orphan sweep

@pytest.mark.timeout(60)
def test_orphan_sweep_aborts_strays_but_not_the_daemons_own_upload(tmp_path, emulator, daemon_factory):
    drop = tmp_path / "drop"
    drop.mkdir()
    bucket = root_bucket(emulator)
    stray = bucket.init_multipart_upload("in/stray.bin").upload_id
    bucket.upload_part("in/stray.bin", stray, 1, b"x" * 1000)
    outside = bucket.init_multipart_upload("other/keep.bin").upload_id     # not under a watch prefix
    emulator.set_faults([{"op": "UploadPart", "delay_ms": 400}])
    data = random_file(drop / "big.bin", 8 * MiB, seed=6)                    # 8 parts, 2 at a time: ~2 s
    d = daemon_factory([{"path": str(drop), "prefix": "in/", "settle_seconds": 0.3}],
                upload=fast_upload(part_size="1MiB", multipart_threshold=1 * MiB, parallel_parts=2),
                daemon={"rescan_interval": 5.0, "orphan_max_age": 0, "orphan_sweep_interval": 0.5})
    d.start()
    d.wait_states({"done": 1}, 40)
    assert object_bytes(emulator, "in/big.bin") == data
    open_ids = {u["upload_id"] for u in emulator.uploads()}
    assert stray not in open_ids and outside in open_ids
    aborted = events(d, "orphan upload aborted")
    assert [(e["key"], e["upload_id"]) for e in aborted] == [("in/stray.bin", stray)]
    # sweeps ran while the daemon's own upload was open, and left it alone
    sweeps = events(d, "orphan sweep")
    assert sum(1 for e in sweeps if e["listed"] >= 1 and e["aborted"] == 0) >= 2, sweeps
    assert emulator.stats()["requests"]["InitiateMultipartUpload"] == 3          # 2 strays + ours, no restart
    assert d.stop() == 0


class _FakeStore:
    def __init__(self, uploads):
        self.uploads = uploads
        self.aborted = []

    def list_uploads(self, prefix, cancel=None):
        return [u for u in self.uploads if u.key.startswith(prefix)]

    def abort(self, key, upload_id, cancel=None):
        self.aborted.append(upload_id)


@pytest.mark.timeout(30)
def test_sweep_rules_owned_uploading_age_and_prefix(tmp_path):
    """The window between InitiateMultipartUpload and its record: an unrecorded upload whose
    file is `uploading` is never swept, even with orphan_max_age = 0."""
    from ossyncd.model import OpenUpload
    from ossyncd.state import State
    from ossyncd.sweeper import Sweeper

    st = State(tmp_path / "state.db")
    now = 10_000.0
    owned, _ = st.observe("/d/owned", "/d", "in/owned", Identity(10, 1, 1))
    st.begin_upload(owned.id, "id-owned", "in/owned", 5, owned.identity)
    busy, _ = st.observe("/d/busy", "/d", "in/busy", Identity(10, 1, 2))
    st.transition(busy.id, "uploading")                    # initiated, not recorded yet
    ups = [OpenUpload("in/owned", "id-owned", now - 10**6), OpenUpload("in/busy", "id-busy", now - 10**6),
           OpenUpload("in/old-stray", "id-old", now - 7200), OpenUpload("in/new-stray", "id-new", now - 60),
           OpenUpload("elsewhere/x", "id-elsewhere", now - 10**6)]
    cfg = lambda max_age: SimpleNamespace(watch=[SimpleNamespace(prefix="in/"), SimpleNamespace(prefix="in/sub/")],
                                          daemon=SimpleNamespace(orphan_max_age=max_age, orphan_sweep_interval=3600))
    store = _FakeStore(ups)
    sw = Sweeper(store, st, cfg(3600))
    assert sw.prefixes() == ["in/"]
    assert [u.upload_id for u in sw.tick(now)] == ["id-old"]
    assert sw.tick(now + 10) is None and sw.next_at == now + 3600          # not due again yet
    sw.cfg = cfg(0)
    sw.next_at = 0
    store.aborted.clear()
    sw.tick(now)
    assert sorted(store.aborted) == ["id-new", "id-old"]                   # still never owned or busy
    st.set_meta("paused", "1")
    sw.next_at = 0
    store.aborted.clear()
    assert sw.tick(now) is None and store.aborted == []
    st.close()


# ------------------------------------------------------------------------ metrics

@pytest.mark.timeout(60)
def test_metrics_endpoint_counts_what_was_uploaded(tmp_path, emulator, daemon_factory):
    drop = tmp_path / "drop"
    drop.mkdir()
    sizes = [0, 1000, 70_000, 2 * MiB + 5, 3 * MiB]
    files = {f"f{i}.bin": random_file(drop / f"f{i}.bin", n, seed=10 + i) for i, n in enumerate(sizes)}
    emulator.set_faults([{"op": "PutObject", "status": 503, "count": 1}])
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}],
                upload=fast_upload(part_size="1MiB", multipart_threshold=1 * MiB),
                metrics={"listen": "127.0.0.1:0"})
    d.start()
    d.wait_states({"done": len(files)}, 40)
    for k, v in files.items():
        assert object_bytes(emulator, k) == v
    listening = wait_until(lambda: events(d, "metrics listening"), 10, what="metrics listening")[0]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", listening["address"]) and not listening["address"].endswith(":0")
    m = scrape(listening["url"])
    assert m["ossyncd_uploads_completed_total"] == len(files)
    assert m["ossyncd_uploaded_bytes_total"] == sum(sizes)
    assert m["ossyncd_uploads_failed_total"] == 0
    assert m['ossyncd_files{state="done"}'] == len(files) and m['ossyncd_files{state="failed"}'] == 0
    assert m["ossyncd_queue_depth"] == 0 and m["ossyncd_paused"] == 0
    assert m['ossyncd_request_retries_total{op="PutObject"}'] == 1
    parts = sum(-(-n // MiB) for n in sizes if n >= MiB)
    assert m["ossyncd_part_upload_seconds_count"] == parts == emulator.stats()["requests"]["UploadPart"]
    assert m['ossyncd_part_upload_seconds_bucket{le="+Inf"}'] == parts
    assert m["ossyncd_credentials_expiry_timestamp_seconds"] > time.time()
    assert time.time() - 60 < m["ossyncd_last_upload_timestamp_seconds"] <= time.time()
    assert m["ossyncd_orphan_uploads_aborted_total"] == 0
    assert d.stop() == 0


@pytest.mark.timeout(30)
def test_metrics_listen_is_validated(tmp_path, emulator):
    cfg = write_config(tmp_path / "c.toml", emulator, state=tmp_path / "state.db", metrics={"listen": "9464"})
    r = ossyncd("check-config", "-c", cfg)
    assert r.returncode == 2 and "metrics.listen" in r.stderr and "HOST:PORT" in r.stderr, r.stderr


@pytest.mark.timeout(60)
def test_state_commands_work_without_the_key_pair_the_service_gets_from_its_environment(tmp_path, emulator,
                                                                                        daemon_factory):
    """Under systemd the key pair is in credentials.env, which only the service reads: status,
    list, pause, resume and retry, run as the service user, must not need it; check-config does."""
    from tests.helpers import sts_credentials

    creds = sts_credentials(emulator)
    keys = {"OSSYNCD_ACCESS_KEY_ID": creds.pop("access_key_id"), "OSSYNCD_ACCESS_KEY_SECRET": creds.pop("access_key_secret")}
    drop = tmp_path / "drop"
    drop.mkdir()
    d = daemon_factory([{"path": str(drop), "prefix": "", "settle_seconds": 0.3}], credentials=creds)
    d.start(env=keys)
    data = random_file(drop / "a.txt", 2000, seed=1)
    d.wait_states({"done": 1}, 30)
    assert object_bytes(emulator, "a.txt") == data
    for args in (["status", "--json"], ["list", "--json"], ["pause"], ["resume"], ["retry"]):
        r = ossyncd(*args, "-c", d.config)
        assert r.returncode == 0, (args, r.stderr)
    assert json.loads(ossyncd("status", "-c", d.config, "--json").stdout)["counts"]["done"] == 1
    r = ossyncd("check-config", "-c", d.config)
    assert r.returncode == 2 and "credentials.access_key_id/access_key_secret: required" in r.stderr, r.stderr
    assert d.stop() == 0
