"""STS credentials end to end: rotation under a long upload, forced expiry, STS outages,
bad credentials, secret hygiene and `ossyncd policy`.

Everything goes through the real oss2 and aliyun-python-sdk-sts clients against the
emulator, with ossyncd as a real subprocess (`ossyncd upload` or `ossyncd run`).
Unit tests of the rotation logic with a fake clock live in test_credentials_unit.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ossyncd.state import State
from tests import helpers
from tests.helpers import MiB, object_bytes, ossyncd, random_file, wait_until, write_config
from tests.helpers import sts_credentials as sts_config

AUTH_CODES = {"SecurityTokenExpired", "InvalidAccessKeyId", "InvalidSecurityToken"}
PART = 128 * 1024


# --------------------------------------------------------------------------- helpers


def auth_errors(stats: dict) -> dict[str, dict[str, int]]:
    """{op: {code: n}} for the authorization rejections OSS counted."""
    out = {}
    for op, codes in stats.get("errors", {}).items():
        bad = {c: n for c, n in codes.items() if c in AUTH_CODES}
        if bad:
            out[op] = bad
    return out


def assume_role_calls(stats: dict) -> int:
    return stats.get("requests", {}).get("AssumeRole", 0)


def read_db(db: Path, sql: str, params=()) -> list[tuple]:
    """A cheap read-only look at the daemon's state DB (waiting through the CLI costs ~1 s a call)."""
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []


class StateRecorder:
    """Records every state each file is seen in, from two observers:

    * `ossyncd list --json` in a loop (the product's own view; ~1 poll/s, as each CLI run
      takes ~1 s here; optional, because it costs most of a core), and
    * a read-only SQLite connection polled every 20 ms (catches short blips).

    Each observer keeps its own history (a slow `list` result landing after a fast DB read
    must not look like a state change): `history[path]` (DB) and `cli_history[path]`, each
    the sequence of distinct consecutive states that observer saw.
    """

    def __init__(self, config: Path, db: Path, *, cli: bool = True):
        self.config, self.db = config, db
        self.history: dict[str, list[str]] = {}
        self.cli_history: dict[str, list[str]] = {}
        self.rows: dict[str, dict] = {}          # last row seen per path (from list --json)
        self.errors_seen: dict[str, set[str]] = {}
        self.list_polls = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._db_loop, daemon=True)]
        if cli:
            self._threads.append(threading.Thread(target=self._cli_loop, daemon=True))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _see(self, path: str, state: str, error: str | None, history: dict | None = None) -> None:
        with self._lock:
            h = (self.history if history is None else history).setdefault(path, [])
            if not h or h[-1] != state:
                h.append(state)
            if error:
                self.errors_seen.setdefault(path, set()).add(error)

    def _cli_loop(self):
        while not self._stop.is_set():
            r = ossyncd("list", "-c", self.config, "--json", timeout=30)
            if r.returncode == 0:
                self.list_polls += 1
                for f in json.loads(r.stdout):
                    self.rows[f["path"]] = f
                    self._see(f["path"], f["state"], f["error"], self.cli_history)
            self._stop.wait(0.05)

    def _db_loop(self):
        while not self._stop.is_set():
            for path, state, error in read_db(self.db, "SELECT path, state, error FROM files"):
                self._see(path, state, error)
            self._stop.wait(0.02)

    def states(self) -> set[str]:
        with self._lock:
            return {s for hs in (self.history, self.cli_history) for h in hs.values() for s in h}

    def after_uploading(self, path: str, *, cli: bool = False) -> list[str]:
        """The states from the first `uploading` on, as the DB poll (or `list --json`) saw them."""
        with self._lock:
            h = list((self.cli_history if cli else self.history).get(path, []))
        return h[h.index("uploading"):] if "uploading" in h else h


class Daemon(helpers.Daemon):
    """The shared daemon helper, plus direct reads of its state DB."""

    def __init__(self, tmp: Path, emu, *, watches: list[dict], credentials: dict, upload: dict | None = None,
                 daemon: dict | None = None, name: str = "d"):
        super().__init__(tmp, emu, watches, name=name, credentials=credentials, upload=upload or fast_upload(),
                         daemon={"rescan_interval": 30.0, **(daemon or {})})

    def start(self) -> "Daemon":
        super().start()
        wait_until(lambda: self.alive() and State.lock_holder(self.db) == self.proc.pid, 20, interval=0.05,
                   what="daemon start")
        return self

    def credentials(self) -> dict:
        """What the daemon published for `status` (meta "credentials"), read straight from the DB."""
        rows = read_db(self.db, "SELECT value FROM meta WHERE name='credentials'")
        return json.loads(rows[0][0]) if rows and rows[0][0] else {}

    def db_files(self) -> dict[str, tuple[str, str | None]]:
        return {p: (st, err) for p, st, err in read_db(self.db, "SELECT path, state, error FROM files")}

    def alive(self) -> bool:
        assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.output()[-3000:]}"
        return True

    def stop(self) -> int:
        try:
            return super().stop(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return self.proc.returncode


def fast_upload(**kw) -> dict:
    return {"multipart_threshold": "1MiB", "part_size": "128KiB", "parallel_parts": 4, "max_files_in_flight": 4,
            "retry_backoff": 0.05, "retry_backoff_max": 0.2, "file_retry_delay": 1.0,
            "file_retry_delay_max": 2.0, **kw}


@pytest.fixture
def daemons():
    made: list[Daemon] = []
    yield made
    for d in made:
        d.stop()


def issued_secrets(emu) -> list[str]:
    """Every AccessKeySecret and SecurityToken the emulator's STS has issued (read in-process:
    the emulator keeps its sessions in Authority._by_token)."""
    with emu.authority._lock:
        sessions = list(emu.authority._by_token.values())
    return [v for s in sessions for v in (s.secret, s.token)]


# --------------------------------------------------------------------------- 1. long upload, 3 s tokens


@pytest.mark.timeout(120)
def test_long_multipart_upload_rotates_3s_tokens_without_auth_failures(tmp_path, emulator):
    """A >= 30 s multipart upload (64 parts, each held 950 ms by the server, 2 in parallel) with
    3-second STS tokens through `ossyncd upload`: byte-equal, >= 10 AssumeRole calls, and not one
    request rejected for authorization. Rotation runs at 80% of the lifetime (~2.4 s), and the
    emulator, like OSS, checks expiry when a request arrives, not when its response leaves, so a
    part signed just before a rotation is still accepted."""
    db = tmp_path / "state.db"
    cfg = write_config(tmp_path / "ossyncd.toml", emulator, state=db,
                       credentials=sts_config(emulator, duration_seconds=3),
                       upload=fast_upload(parallel_parts=2, max_files_in_flight=1))
    src = tmp_path / "src" / "long.bin"
    data = random_file(src, 64 * PART, seed=1)
    emulator.set_faults([{"op": "UploadPart", "delay_ms": 950}])
    with StateRecorder(cfg, db, cli=False) as rec:
        t0 = time.monotonic()
        r = ossyncd("upload", "-c", cfg, "--prefix", "long/", src, timeout=100)
        elapsed = time.monotonic() - t0
        time.sleep(0.1)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = emulator.stats()
    calls = assume_role_calls(stats)
    print(f"\n[rotation] upload {elapsed:.1f}s, AssumeRole {calls}, sts_issued {stats['sts_issued']}, "
          f"UploadPart {stats['requests'].get('UploadPart')}, auth errors {auth_errors(stats)}")
    assert elapsed >= 30, f"the upload took only {elapsed:.1f}s"
    assert object_bytes(emulator, "long/long.bin") == data
    assert calls >= 10 and stats["sts_issued"] >= 10, stats
    assert auth_errors(stats) == {}, stats["errors"]
    assert stats["requests"]["UploadPart"] == 64, "a part was sent twice"
    assert rec.after_uploading(str(src)) == ["uploading", "done"], rec.history
    (row,) = [f for f in json.loads(ossyncd("list", "-c", cfg, "--json").stdout) if f["path"] == str(src)]
    assert row["state"] == "done" and row["attempts"] == 0 and not row["error"], row
    for secret in [emulator.user.secret, *issued_secrets(emulator)]:
        assert secret not in r.stdout and secret not in r.stderr


# --------------------------------------------------------------------------- 2 + 5. forced expiry, secrets


@pytest.fixture(scope="module")
def expiry_run(tmp_path_factory):
    """One daemon run shared by the forced-expiry and the secret-hygiene tests: STS credentials
    (900 s tokens, so only the forced expiry causes a refresh), the config written 0644 with a
    literal access_key_secret, debug logging, a 48-part upload and POST /-/expire-tokens while
    parts are in flight. Collects everything the two tests look at."""
    from tests.ossemu import Emulator

    tmp = tmp_path_factory.mktemp("expiry")
    emu = Emulator(str(tmp / "ossemu"), buckets=["drop"], min_duration=1).start()
    drop = tmp / "drop"
    drop.mkdir()
    d = Daemon(tmp, emu, watches=[{"path": str(drop), "prefix": "in/", "settle_seconds": 0.3}],
               credentials=sts_config(emu, duration_seconds=900), daemon={"log_level": "debug"})
    os.chmod(d.config, 0o644)
    out: dict = {"emu": emu, "daemon": d}
    try:
        d.start()
        emu.set_faults([{"op": "UploadPart", "delay_ms": 300}])
        data = random_file(tmp / "staging" / "big.bin", 48 * PART, seed=2)
        path = drop / "big.bin"
        with StateRecorder(d.config, d.db) as rec:
            os.rename(tmp / "staging" / "big.bin", path)
            # let a few parts land, then expire every token while parts are in flight
            wait_until(lambda: emu.stats()["requests"].get("UploadPart", 0) >= 8, 30, what="8 parts")
            before = emu.stats()
            out["expired"] = emu.expire_tokens()
            t_expired = time.monotonic()
            # hold the remaining parts until `list --json` (~1 s a run, several on busy cores) has
            # looked a few times, so its view of the upload is not just its first and last poll
            emu.set_faults([{"op": "UploadPart", "delay_ms": 2000}])
            wait_until(lambda: rec.list_polls >= 3, 60, what="3 `list --json` polls during the upload")
            emu.set_faults([{"op": "UploadPart", "delay_ms": 300}])
            wait_until(lambda: rec.history.get(str(path), [""])[-1] == "done", 60, interval=0.02, what="done")
            out["done_after_expiry"] = time.monotonic() - t_expired
            wait_until(lambda: rec.rows.get(str(path), {}).get("state") == "done", 10, what="list --json: done")
        after = emu.stats()
        out.update(path=str(path), data=data, rec=rec, before=before, after=after,
                   object=object_bytes(emu, "in/big.bin"))
        # everything an operator (or a log collector) can see, while the daemon runs ...
        out["views"] = {}
        for args in (("status",), ("status", "--json"), ("list",), ("list", "--json")):
            r = ossyncd(*args, "-c", d.config)
            assert r.returncode == 0, r.stderr
            out["views"][" ".join(args)] = r.stdout + r.stderr
        out["db_running"] = {p.name: p.read_bytes() for p in tmp.glob(f"{d.db.name}*")}
        out["issued"] = issued_secrets(emu)
    finally:
        out["rc"] = d.stop()
        emu.stop()
    # ... and after it stopped (the WAL is checkpointed into the main file)
    out["db_stopped"] = {p.name: p.read_bytes() for p in tmp.glob(f"{d.db.name}*")}
    out["log"] = d.output()
    return out


@pytest.mark.timeout(90)
def test_forced_expiry_mid_upload_is_invisible_and_single_flight(expiry_run):
    """POST /-/expire-tokens while parts are in flight: requests arriving after it are rejected
    with SecurityTokenExpired, the daemon refreshes once for all of them (single flight) and
    retries them; the file never leaves `uploading` (seen by `ossyncd list --json` and by a 20 ms
    DB poll), nothing is counted as an attempt, and the object is byte-equal."""
    run = expiry_run
    before, after = run["before"], run["after"]
    extra = assume_role_calls(after) - assume_role_calls(before)
    rejected = sum(auth_errors(after).get("UploadPart", {}).values())
    print(f"\n[expiry] expired {run['expired']} token(s); AssumeRole +{extra}; UploadPart rejected "
          f"{rejected}; done {run['done_after_expiry']:.1f}s after the expiry; "
          f"`list --json` polls {run['rec'].list_polls}")
    assert run["object"] == run["data"]
    assert run["expired"] >= 1
    assert rejected >= 1, "the expiry hit no request; the test proves nothing"
    assert extra == 1, f"{extra} AssumeRole calls for one expiry (single flight expected)"
    rec = run["rec"]
    assert rec.after_uploading(run["path"]) == ["uploading", "done"], rec.history
    assert rec.after_uploading(run["path"], cli=True) == ["uploading", "done"], rec.cli_history
    assert run["rec"].list_polls >= 3
    row = run["rec"].rows[run["path"]]
    assert row["state"] == "done" and row["attempts"] == 0 and not row["error"], row
    assert run["rc"] == 0


@pytest.mark.timeout(90)
def test_no_secret_anywhere_and_world_readable_config_warns(expiry_run):
    """The RAM user's secret and every issued AccessKeySecret / SecurityToken are absent from the
    daemon's whole stdout+stderr (debug level), `status` and `list` (text and --json) and the
    state DB bytes (with its WAL, while running and after stopping). The 0644 config holding a
    literal secret is reported at startup."""
    run = expiry_run
    emu = run["emu"]
    secrets = {"user secret": emu.user.secret}
    for i, s in enumerate(run["issued"]):
        secrets[f"issued #{i}"] = s
    assert len(run["issued"]) >= 4  # 2 sessions at least: the first and the forced refresh
    haystacks = {"daemon output": run["log"].encode(), **{k: v.encode() for k, v in run["views"].items()},
                 **{f"running {k}": v for k, v in run["db_running"].items()},
                 **{f"stopped {k}": v for k, v in run["db_stopped"].items()}}
    assert any(k.endswith("state.db") for k in haystacks) and any(k.endswith("-wal") for k in haystacks)
    for where, blob in haystacks.items():
        for what, secret in secrets.items():
            assert secret.encode() not in blob, f"{what} found in {where}"
            assert secret[:20].encode() not in blob, f"a prefix of the {what} found in {where}"
    log = run["log"]
    assert "config file permissions" in log and "chmod 600" in log and "0644" in log, log[:2000]
    assert "credentials.refreshed" in log and "credentials.rejected_by_server" in log


# --------------------------------------------------------------------------- 3. STS outage


@pytest.mark.timeout(90)
def test_sts_outage_queues_uploads_shows_why_and_recovers_quickly(tmp_path, emulator, daemons):
    """AssumeRole answers 503 or resets the connection for 10 s while files arrive: nothing
    fails, `status --json` shows the credential error and the next attempt, and once STS is
    back every file is done within the credential backoff cap + settle + a small margin."""
    backoff_max, settle, margin = 2.0, 0.3, 2.0
    drop = tmp_path / "drop"
    drop.mkdir()
    # file_retry_delay at its default (30 s): a file waiting for credentials must come back when
    # the credentials are next fetched, not on its own (much slower) retry clock
    d = Daemon(tmp_path, emulator, watches=[{"path": str(drop), "prefix": "out/", "settle_seconds": settle}],
               credentials=sts_config(emulator, duration_seconds=3, retry_backoff=0.5,
                                      retry_backoff_max=backoff_max),
               upload=fast_upload(file_retry_delay=30.0, file_retry_delay_max=3600.0))
    daemons.append(d)
    d.start()
    wait_until(lambda: d.credentials().get("healthy"), 15, what="first token")
    files = {}
    with StateRecorder(d.config, d.db, cli=False) as rec:
        emulator.set_faults([
            {"op": "AssumeRole", "reset_after_bytes": 0, "probability": 0.5, "seed": 7},
            {"op": "AssumeRole", "status": 503, "code": "ServiceUnavailable"},
        ])
        fault_start = time.monotonic()
        samples, views = [], []
        while time.monotonic() - fault_start < 10:
            # the last good token was fetched at most ~0.1 s after the fault began; it has expired
            # (3 s tokens) by 3.1 s, so files dropped at 3.5 s have nothing to upload with
            if not files and time.monotonic() - fault_start > 3.5:
                for i, size in enumerate([0, 1000, 70_000, 300_000, 2 * MiB + 5]):
                    files[f"f{i}.bin"] = random_file(drop / f"f{i}.bin", size, seed=30 + i)
            samples.append((time.monotonic() - fault_start, d.credentials()))
            if time.monotonic() - fault_start > 6 and len(views) < 2:   # the product's own views
                views.append(d.status())
                views.append(ossyncd("status", "-c", d.config).stdout)
            time.sleep(0.1)
        emulator.clear_faults()
        fault_end = time.monotonic()
        wait_until(lambda: all(rec.history.get(str(drop / n), [""])[-1] == "done" for n in files), 30,
                   interval=0.02, what="all files done after STS recovered")
        recovery = time.monotonic() - fault_end
    stats = emulator.stats()
    # the first failed rotation comes <= 2.5 s into the fault and is published within 1 s
    late = [c for t, c in samples if t > 4.0]
    st_json, st_text = views
    print(f"\n[outage] all done {recovery:.2f}s after STS came back (bound {backoff_max + settle + margin:.1f}s); "
          f"AssumeRole {assume_role_calls(stats)} {stats['errors'].get('AssumeRole')}; "
          f"status: {st_json['credentials']}")
    assert stats["errors"].get("AssumeRole", {}).get("ServiceUnavailable", 0) >= 1
    assert stats["errors"].get("AssumeRole", {}).get("ConnectionReset", 0) >= 1
    # while it lasted, status said why and when the next attempt is
    assert late and all(c["last_error"] and c["next_attempt_at"] and not c["healthy"] for c in late), late
    assert all(("ServiceUnavailable" in c["last_error"] or "connection reset" in c["last_error"])
               and "will retry" in c["last_error"] for c in late), late
    creds = st_json["credentials"]
    assert creds["error"] and "will retry" in creds["error"] and creds["next_attempt_at"], creds
    assert "error:" in st_text and "next attempt" in st_text, st_text
    # the files waited for credentials (they had no token to upload with) and nothing failed
    assert "failed" not in rec.states(), rec.history
    waited = [e for errs in rec.errors_seen.values() for e in errs if e.startswith("waiting for credentials")]
    assert waited, rec.errors_seen
    assert recovery <= backoff_max + settle + margin, f"done {recovery:.2f}s after STS came back"
    for name, data in files.items():
        assert object_bytes(emulator, f"out/{name}") == data, name
    final = d.status()
    assert final["credentials"]["error"] is None and final["counts"]["failed"] == 0, final
    assert all(f["attempts"] == 0 and f["state"] == "done" for f in d.files())
    d.alive()


@pytest.mark.timeout(120)
def test_status_clears_the_credential_error_before_any_file_is_done(tmp_path, emulator, daemons):
    """The credential error is published when a refresh succeeds, not on the next status tick: no
    read of the state DB sees a file uploaded after an outage next to the outage's error."""
    drop = tmp_path / "drop"
    drop.mkdir()
    d = Daemon(tmp_path, emulator, watches=[{"path": str(drop), "prefix": "", "settle_seconds": 0.2}],
               credentials=sts_config(emulator, duration_seconds=2, retry_backoff=0.3, retry_backoff_max=0.6),
               upload=fast_upload(file_retry_delay=30.0, file_retry_delay_max=3600.0))
    daemons.append(d)
    d.start()
    wait_until(lambda: d.credentials().get("healthy"), 15, what="first token")
    emulator.set_faults([{"op": "AssumeRole", "status": 503, "code": "ServiceUnavailable"}])
    wait_until(lambda: d.credentials().get("last_error") and not d.credentials().get("healthy"), 15,
               what="the outage in status")
    data = random_file(drop / "a.bin", 1000, seed=1)
    wait_until(lambda: d.db_files().get(str(drop / "a.bin"), ("",))[0] == "retry_wait", 15,
               what="the file waiting for credentials")
    emulator.clear_faults()
    con = sqlite3.connect(f"file:{d.db}?mode=ro", uri=True, timeout=5, isolation_level=None)
    try:
        def snapshot():   # one read transaction: the file's state and the published status together
            con.execute("BEGIN")
            try:
                (state,), = con.execute("SELECT state FROM files WHERE path=?", [str(drop / "a.bin")])
                (creds,), = con.execute("SELECT value FROM meta WHERE name='credentials'")
            finally:
                con.execute("COMMIT")
            return state, json.loads(creds)
        state, creds = wait_until(lambda: (lambda s: s if s[0] == "done" else None)(snapshot()), 30,
                                  interval=0.005, what="the file done after the outage")
    finally:
        con.close()
    assert creds["last_error"] is None and creds["healthy"], creds
    assert object_bytes(emulator, "a.bin") == data
    d.alive()


# --------------------------------------------------------------------------- 4. bad credentials


DENY_IN = json.dumps({"Version": "1", "Statement": [
    {"Effect": "Allow", "Action": "oss:*", "Resource": "*"},
    {"Effect": "Deny", "Action": "oss:*", "Resource": "acs:oss:*:*:drop/in/*"}]})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["wrong_secret", "unknown_role", "policy_denies_prefix"])
def test_bad_credentials_give_one_actionable_line(tmp_path, emulator, daemons, case):
    """check-config exits non-zero with one actionable line; a running daemon keeps running and
    `status` shows the same reason (the credentials error, or the file's AccessDenied)."""
    if case == "wrong_secret":
        creds = sts_config(emulator, access_key_secret="wrongSECRETwrongSECRET0000")
        expect = ["the AccessKey secret is wrong", "check credentials.access_key_secret"]
    elif case == "unknown_role":
        arn = emulator.role_arn.rsplit("/", 1)[0] + "/no-such-role"
        creds = sts_config(emulator, role_arn=arn)
        expect = ["EntityNotExist.Role", f"the role {arn} does not exist", "check credentials.role_arn"]
    else:
        creds = sts_config(emulator, policy=DENY_IN)
        expect = ["AccessDenied", "'in/'", "credentials.policy"]
    creds.update(retry_backoff=0.5, retry_backoff_max=2.0)
    drop = tmp_path / "drop"
    drop.mkdir()
    d = Daemon(tmp_path, emulator, watches=[{"path": str(drop), "prefix": "in/", "settle_seconds": 0.2}],
               credentials=creds)
    daemons.append(d)

    r = ossyncd("check-config", "-c", d.config)
    problem = r.stderr.strip()
    print(f"\n[{case}] check-config exit {r.returncode}: {problem}")
    assert r.returncode != 0, r.stdout + r.stderr
    assert len(problem.splitlines()) == 1, problem
    for needle in expect:
        assert needle in problem, problem
    assert emulator.stats()["uploads_open"] == 0  # the probe left nothing behind

    d.start()
    random_file(drop / "x.bin", 5000, seed=4)
    want = "failed" if case == "policy_denies_prefix" else "retry_wait"
    wait_until(lambda: d.alive() and [s for s, _ in d.db_files().values()] == [want], 20,
               what=f"the file in {want}")
    if want == "retry_wait":  # the scheduler publishes the credentials' status every second
        wait_until(lambda: d.credentials().get("last_error"), 5, what="the credentials error published")
    st, text, (row,) = d.status(), ossyncd("status", "-c", d.config).stdout, d.files()
    if case == "policy_denies_prefix":
        reason = row["error"]
        assert "AccessDenied" in reason and "credentials.policy" in reason and "ossyncd policy" in reason, reason
        assert any("AccessDenied" in f["error"] for f in st["failures"]), st
        assert st["credentials"]["error"] is None
    else:
        reason = st["credentials"]["error"]
        assert reason and st["credentials"]["next_attempt_at"], st
        for needle in expect:
            assert needle in reason, reason
        assert st["counts"]["failed"] == 0 and st["counts"]["done"] == 0, st
        assert row["state"] == "retry_wait" and row["error"].startswith("waiting for credentials"), row
        assert row["attempts"] == 0
    print(f"[{case}] status: {reason}")
    assert len(reason.splitlines()) == 1
    assert expect[0] in " ".join(text.split()), text
    assert st["daemon"]["running"]
    d.alive()


# --------------------------------------------------------------------------- 6. policy


@pytest.mark.timeout(60)
def test_policy_command_prints_the_eight_actions(tmp_path, emulator):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfg = write_config(tmp_path / "p.toml", emulator, state=tmp_path / "state.db",
                       watches=[{"path": str(a), "prefix": "incoming/"}, {"path": str(b), "prefix": "scans/2024/"}])
    r = ossyncd("policy", "-c", cfg)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    actions = [a for st in doc["Statement"] for a in st["Action"]]
    assert sorted(actions) == sorted([
        "oss:PutObject", "oss:InitiateMultipartUpload", "oss:UploadPart", "oss:UploadPartCopy",
        "oss:CompleteMultipartUpload", "oss:AbortMultipartUpload", "oss:ListMultipartUploads", "oss:ListParts"])
    assert all(st["Effect"] == "Allow" for st in doc["Statement"])
    resources = {a: st["Resource"] for st in doc["Statement"] for a in st["Action"]}
    assert resources["oss:ListMultipartUploads"] == ["acs:oss:*:*:drop"]
    assert sorted(resources["oss:PutObject"]) == ["acs:oss:*:*:drop/incoming/*", "acs:oss:*:*:drop/scans/2024/*"]
    assert doc["Version"] == "1"
