"""The chaos scenarios, each a function of its counts: tests/chaos/test_*.py run them at full
size under the `chaos` marker (make chaos), tests/test_chaos_short.py at a small size in
`make test`. Each one runs the daemon as a subprocess against the emulator on the mixed
workload, ends with `invariants.check` and returns its figures for `report.record`."""

from __future__ import annotations

import json
import random
import signal
import time
from datetime import datetime
from pathlib import Path

from ossyncd import crashpoint
from tests.chaos import invariants
from tests.chaos.workload import Workload, counts, sweep_config, wait_converged
from tests.helpers import MiB, events, fast_upload, wait_until

THRESHOLD = 1 * MiB
PART = 256 * 1024
PARALLEL_PARTS = 4
FILES_IN_FLIGHT = 4
# What one kill may cost: every file in flight re-sends what it had not recorded, at most a whole
# simple file (under the threshold) or its window of parts (docs/architecture.md §4).
PER_KILL = FILES_IN_FLIGHT * max(THRESHOLD, PARALLEL_PARTS * PART)


def upload_cfg(**kw) -> dict:
    return fast_upload(**{"multipart_threshold": THRESHOLD, "part_size": PART, "parallel_parts": PARALLEL_PARTS,
                          "max_files_in_flight": FILES_IN_FLIGHT, **kw})


class Setup:
    """Three watches (keep, delete after upload, move after upload) fed by one workload each."""

    def __init__(self, tmp_path: Path, daemon_factory, seed: int, *, max_size: int, settle: float = 0.3,
                 threshold: int = THRESHOLD, part: int = PART, tiny: float = 0.25, **sections):
        self.tmp = tmp_path
        self.moved = tmp_path / "moved"
        modes = {"keep": {}, "delete": {"after_upload": "delete"},
                 "move": {"after_upload": "move", "move_to": str(self.moved)}}
        self.loads = {m: Workload(tmp_path / f"drop-{m}", f"{m}/", seed + i, staging=tmp_path / f"staging-{m}",
                                  threshold=threshold, part=part, max_size=max_size if m == "keep" else 4 * MiB,
                                  rewrites=m == "keep", tiny=tiny)
                      for i, m in enumerate(modes)}
        watches = [{"path": str(w.root), "prefix": w.prefix, "settle_seconds": settle, **modes[m]}
                   for m, w in self.loads.items()]
        sections.setdefault("upload", upload_cfg(multipart_threshold=threshold, part_size=part))
        sections.setdefault("daemon", sweep_config())
        self.d = daemon_factory(watches, **sections)

    def batch(self, n: int, **kw) -> None:
        for i, w in enumerate(self.loads.values()):
            w.batch(max(1, n // 3) if i else n - 2 * (n // 3), **kw)

    def wait_writers(self) -> None:
        for w in self.loads.values():
            w.wait()

    def expected(self) -> dict[str, bytes]:
        return {k: v for w in self.loads.values() for k, v in w.expected.items()}

    def never(self) -> set[str]:
        return {k for w in self.loads.values() for k in w.never}

    def legit_extra(self) -> int:
        return sum(w.legit_extra for w in self.loads.values())

    def check(self, **kw) -> dict:
        figures = invariants.check_daemon(self.d, self.expected(), self.never(), legit_extra=self.legit_extra(), **kw)
        # a verified upload in a delete or move watch leaves nothing behind, even across kills
        for m in ("delete", "move"):
            w = self.loads[m]
            left = [p for p in w.root.rglob("*") if p.is_file() and w.key(str(p.relative_to(w.root))) in w.expected]
            assert not left, f"after_upload = {m}: uploaded sources left behind: {left[:5]}"
        for w in self.loads.values():
            w.clean()
        return figures


def _kill(d) -> None:
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(30)
    d.stop()


def _wait_started(d, offset: int) -> None:
    def started():
        with open(d.log_path, "rb") as f:
            f.seek(offset)
            return b'"event": "started"' in f.read() or d.proc.poll() is not None
    wait_until(started, 60, interval=0.05, what=f"the daemon started (log: {d.log_path})")


def _resends(d, sizes: dict[str, int]) -> int:
    """Bytes of files sent whole again because a kill fell between Complete and the commit of
    `done` (their checkpointed upload is gone at restart; docs/verification.md): the one
    documented cost beyond the parts in flight."""
    return sum(sizes.get(e.get("path"), 0) for e in events(d, "checkpointed upload is gone on the server; starting over"))


def _sizes(s: Setup) -> dict[str, int]:
    return {str(w.root / k[len(w.prefix):]): len(v) for w in s.loads.values() for k, v in w.expected.items()}


def kills(tmp_path: Path, daemon_factory, *, random_kills: int, per_point: int, max_size: int, seed: int = 15,
          deadline: float = 600, points: tuple[str, ...] = crashpoint.NAMES, first: int = 12) -> dict:
    """kill -9 at random moments and at every crash point on purpose, with files arriving
    while the daemon is down; then converge and check."""
    rng = random.Random(seed)
    end = time.monotonic() + deadline
    s = Setup(tmp_path, daemon_factory, seed, max_size=max_size)
    d = s.d
    s.batch(first)
    s.loads["keep"].never_settled(4)
    hit: dict[str, int] = {}
    sizes: dict[str, int] = {}
    plan = [None] * random_kills + [p for p in points for _ in range(per_point)]
    rng.shuffle(plan)
    for i, point in enumerate(plan):
        assert time.monotonic() < end, f"kills: deadline passed after {i} kills"
        if i % 3 == 0:
            s.batch(3 + rng.randrange(4))   # arrive while it runs
        if point is None:
            offset = d.log_path.stat().st_size if d.log_path.exists() else 0
            d.start()
            _wait_started(d, offset)
            time.sleep(rng.uniform(0.0, 1.2))   # a random moment of its work (startup rescan, uploads)
        else:
            # work of every kind the point needs: a simple and a multipart file, and a file
            # in each after-upload watch
            s.loads["keep"].batch(2, only=[rng.randint(0, THRESHOLD - 1), rng.randint(THRESHOLD, 3 * THRESHOLD)])
            s.loads["delete"].batch(1, only=[rng.randint(0, 64 * 1024)])
            s.loads["move"].batch(1, only=[rng.randint(0, 64 * 1024)])
            nth = rng.randint(1, 2) if point != "in_commit" else rng.randint(1, 60)
            d.start(env={"OSSYNCD_CRASHPOINT": f"{point}:{nth}"})
            try:
                wait_until(lambda: d.proc.poll() is not None, 20, interval=0.1, what=f"crash point {point}:{nth}")
            except AssertionError:   # not reached this time (the files went elsewhere); killed below
                pass
        _kill(d)
        if point is not None and d.proc.returncode == -signal.SIGKILL:
            hit[point] = hit.get(point, 0) + 1
        if rng.random() < 0.3:
            s.batch(2 + rng.randrange(3), background=False)   # arrive while it is down
        sizes.update(_sizes(s))
    s.wait_writers()
    sizes.update(_sizes(s))
    d.start()
    wait_converged(d, len(s.expected()), max(60.0, end - time.monotonic()), "after the kills")
    fired = sum(1 for e in events(d, "crashpoint"))
    missing = [p for p in points if hit.get(p, 0) < 1]
    assert not missing, f"crash points never hit: {missing} (hits {hit})"
    n_kills = len(plan)
    figures = s.check(resend_bound=n_kills * PER_KILL + _resends(d, sizes))
    d.stop()
    return {"kills": n_kills, "crashpoints": fired, **figures}


# ------------------------------------------------------------------------------------- faults
def fault_rules(p: float) -> list[dict]:
    """Every kind of fault on every write and listing operation, each rule firing with
    probability `p` (rules are drawn in order; the first that fires applies)."""
    writes = ("PutObject", "UploadPart", "InitiateMultipartUpload", "CompleteMultipartUpload")
    rules: list[dict] = []
    seed = 100
    for op in writes + ("ListParts", "ListMultipartUploads", "AbortMultipartUpload"):
        kinds: list[dict] = [{"status": 500, "code": "InternalError"}, {"status": 503},
                             {"status": 429, "code": "Throttling", "retry_after": 1},
                             {"status": 502, "bad_error_body": True},
                             {"delay_ms": 300},                 # slow
                             {"drop_response": True}]
        if op in ("PutObject", "UploadPart"):
            kinds += [{"reset_after_bytes": 4096}, {"flip_bit": True}, {"crc64": "wrong"}, {"crc64": "missing"},
                      {"delay_ms": 1500, "probability_scale": 0.2}]   # a stall past the 1 s read timeout
        else:
            kinds += [{"truncate_body": 25}]
        if op == "CompleteMultipartUpload":
            kinds += [{"crc64": "wrong"}, {"crc64": "missing"}]
        for k in kinds:
            scale = k.pop("probability_scale", 1.0)
            seed += 1
            rules.append({"op": op, "probability": p * scale, "seed": seed, **k})
    return rules


def faults(tmp_path: Path, daemon_factory, emulator, *, target: int, p: float = 0.15, max_size: int = 1 * MiB,
           per_round: int = 30, deadline: float = 600, seed: int = 16) -> dict:
    """Rounds of the mixed workload under a high fault rate until `target` faults fired."""
    end = time.monotonic() + deadline
    # small files and parts: faults are per request, and requests are what 2 cores can afford
    s = Setup(tmp_path, daemon_factory, seed, max_size=max_size, oss={"read_timeout": 1.0},
              threshold=200 * 1024, part=100 * 1024, tiny=0.5,
              upload=upload_cfg(multipart_threshold=200 * 1024, part_size=100 * 1024, request_retries=12,
                                file_retry_delay=0.3, file_retry_delay_max=1.0))
    d = s.d
    s.loads["keep"].never_settled(4)
    emulator.set_faults(fault_rules(p))
    d.start()
    rounds = 0

    def fired() -> int:
        return sum(emulator.stats()["faults"].values())
    while fired() < target:
        assert time.monotonic() < end, f"faults: deadline passed with {fired()} of {target} faults"
        c = counts(d)
        if c["settling"] + c["queued"] + c["uploading"] + c["retry_wait"] < per_round:
            s.batch(per_round)   # keep it busy: files keep arriving while the faults fire
            rounds += 1
        assert c["failed"] == 0, d.files("failed")
        assert d.proc.poll() is None, d.output()[-3000:]
        time.sleep(0.3)
    s.wait_writers()
    wait_converged(d, len(s.expected()), max(60.0, end - time.monotonic()), "after the faults")
    n = fired()
    stats = emulator.stats()
    emulator.clear_faults()
    figures = s.check(uploads_timeout=60)
    d.stop()
    return {"faults": n, "fault_kinds": len({(r["op"], tuple(sorted(set(r) - {"op", "probability", "seed"})))
                                             for r in fault_rules(p)}),
            "requests": sum(stats["requests"].values()), **figures}


# ---------------------------------------------------------------------------------- STS
def sts_cfg(emulator, duration: int, **kw) -> dict:
    from tests.helpers import sts_credentials
    return sts_credentials(emulator, duration_seconds=duration, **kw)


def rotations(tmp_path: Path, daemon_factory, emulator, *, target: int, deadline: float = 300, files: int = 6,
              max_size: int = 4 * MiB, seed: int = 17) -> dict:
    """3-second tokens and forced expiries while parts are in flight, until `target` rotations."""
    end = time.monotonic() + deadline
    s = Setup(tmp_path, daemon_factory, seed, max_size=max_size,
              credentials=sts_cfg(emulator, 3, retry_backoff=0.3, retry_backoff_max=1.0))
    d = s.d
    emulator.set_faults([{"op": "UploadPart", "delay_ms": 200}])   # parts stay in flight across rotations
    d.start()
    wait_until(lambda: emulator.stats()["sts_issued"] >= 1, 30, what="the first token")
    base = emulator.stats()["sts_issued"]
    forced = 0
    while emulator.stats()["sts_issued"] - base < target:
        assert time.monotonic() < end, f"rotations: deadline passed at {emulator.stats()['sts_issued'] - base}"
        s.batch(files)
        time.sleep(0.7)
        emulator.expire_tokens()   # what a revoked or clock-skewed token looks like mid-request
        forced += 1
        assert d.proc.poll() is None, d.output()[-3000:]
        assert counts(d)["failed"] == 0, d.files("failed")
    n = emulator.stats()["sts_issued"] - base
    emulator.clear_faults()
    s.wait_writers()
    wait_converged(d, len(s.expected()), max(60.0, end - time.monotonic()), "after the rotations")
    figures = s.check()
    d.stop()
    return {"rotations": n, "forced_expiries": forced, **figures}


def sts_down(tmp_path: Path, daemon_factory, emulator, *, down: float, token: int = 5, backoff_max: float = 5.0,
             files: int = 3, max_size: int = 2 * MiB, seed: int = 18) -> dict:
    """STS answers 503 or resets for `down` seconds with 5-second tokens while files arrive:
    nothing fails, `status` says why, and every file is done within one credentials retry
    interval (plus settle and a margin) of STS coming back."""
    settle, margin = 0.3, 5.0
    s = Setup(tmp_path, daemon_factory, seed, max_size=max_size, settle=settle,
              credentials=sts_cfg(emulator, token, retry_backoff=0.5, retry_backoff_max=backoff_max),
              upload=upload_cfg(file_retry_delay=30.0, file_retry_delay_max=3600.0))
    d = s.d
    d.start()
    wait_until(lambda: d.status()["credentials"]["expires_at"], 30, what="the first token")
    emulator.set_faults([{"op": "AssumeRole", "reset_after_bytes": 0, "probability": 0.5, "seed": 7},
                         {"op": "AssumeRole", "status": 503, "code": "ServiceUnavailable"}])
    t0 = time.monotonic()
    explained = 0
    while time.monotonic() - t0 < down:
        if time.monotonic() - t0 > token + 1:   # the last token has expired: files wait for credentials
            s.batch(files)
            st = d.status()
            c = st["credentials"]
            assert c["error"] and "will retry" in c["error"] and c["next_attempt_at"], c
            assert st["counts"]["failed"] == 0, d.files("failed")
            explained += 1
        time.sleep(min(2.0, max(0.1, down / 30)))
    s.wait_writers()
    waiting = sum(1 for r in d.files() if r["state"] != "done")
    emulator.clear_faults()
    back, back_wall = time.monotonic(), time.time()
    wait_converged(d, len(s.expected()), backoff_max + settle + margin + 30, "after STS came back")
    polled = time.monotonic() - back
    # when the last file was uploaded by the daemon's own clock (its `uploaded` line), not when a
    # poll saw it: one `ossyncd status` poll costs a second or more on 2 busy cores
    last = max((datetime.fromisoformat(e["timestamp"]).timestamp() for e in events(d, "uploaded")), default=back_wall)
    recovery = max(0.0, last - back_wall)
    assert recovery <= backoff_max + settle + margin, (f"done {recovery:.1f}s after STS came back "
                                                       f"(seen by polling after {polled:.1f}s)")
    assert waiting > 0, "no file waited for credentials: the outage was not felt"
    figures = s.check()
    assert d.status()["credentials"]["error"] is None
    d.stop()
    return {"sts_down_s": round(down), "token_s": token, "waited": waiting, "recovery_s": round(recovery, 1),
            "status_checks": explained, **figures}


# ----------------------------------------------------------------------------- OSS down
def _file_lines(d, since: int, rows: list[dict]) -> dict[str, int]:
    """Log lines about each file (by its path, its key, or its key in an error), from line `since`."""
    by_key = {r["key"]: r["path"] for r in rows}
    lines: dict[str, int] = {}
    for e in [json.loads(x) for x in d.output().splitlines()[since:] if x.startswith("{")]:
        path = e.get("path") or by_key.get(e.get("key", "")) or next(
            (p for k, p in by_key.items() if f"'{k}'" in e.get("error", "")), None)
        if path:
            lines[path] = lines.get(path, 0) + 1
    return lines


def oss_down(tmp_path: Path, daemon_factory, emulator, *, down: float, files: int = 24, max_size: int = 2 * MiB,
             seed: int = 19) -> dict:
    """Every OSS operation fails (503, then refused connections) for `down` seconds under load:
    files wait in retry_wait with a growing backoff, nothing fails, and the log says at most
    one line per file per state change; when OSS is back every file is done."""
    retry_max = max(2.0, down / 6)
    s = Setup(tmp_path, daemon_factory, seed, max_size=max_size,
              upload=upload_cfg(request_retries=3, file_retry_delay=0.5, file_retry_delay_max=retry_max))
    d = s.d
    d.start()
    wait_until(lambda: d.status()["credentials"]["expires_at"], 30, what="the first token")
    log_from = len(d.output().splitlines())
    emulator.set_faults([{"op": "*", "status": 503, "code": "ServiceUnavailable"}])
    s.batch(files)
    s.wait_writers()
    t0 = time.monotonic()
    attempts: dict[str, list[int]] = {}
    while time.monotonic() - t0 < down:
        if time.monotonic() - t0 > down / 2:
            emulator.set_faults([{"op": "*", "refuse": True}])
        for r in d.files():
            attempts.setdefault(r["path"], []).append(r["attempts"])
        c = d.status()["counts"]
        assert c["failed"] == 0 and c["done"] == 0, c
        time.sleep(min(5.0, max(0.5, down / 20)))
    rows = d.files()
    lines = _file_lines(d, log_from, rows)
    emulator.clear_faults()
    # the backoff grew: past the first delay's window (full jitter in [0, base * 2**n] plus base / 2),
    # never past the cap's
    max_attempts = max(r["attempts"] for r in rows)
    assert max_attempts >= 2, rows[:3]
    waits = [e["retry_in"] for e in events(d, "upload will be retried")]
    assert max(waits) > 0.5 * 1.5 and all(w <= retry_max + 0.5 for w in waits), sorted(waits)
    # no log flood: each attempt is one state change (uploading -> retry_wait) and says so once at most
    flood = {p: (n, a) for p, n in lines.items()
             for a in [next((r["attempts"] for r in rows if r["path"] == p), 0)] if n > 2 * a + 3}
    assert not flood, f"log lines per file over one per state change: {list(flood.items())[:5]}"
    wait_converged(d, len(s.expected()), retry_max + 60, "after OSS came back")
    figures = s.check(uploads_timeout=60)
    d.stop()
    return {"oss_down_s": round(down), "max_attempts": max_attempts, "longest_wait_s": max(waits),
            "log_lines_per_file": max(lines.values()) if lines else 0, **figures}


def sigstop(tmp_path: Path, daemon_factory, emulator, *, stopped: float, token: int = 3, files: int = 12,
            max_size: int = 4 * MiB, seed: int = 20) -> dict:
    """SIGSTOP longer than a token lives with uploads in flight, then SIGCONT."""
    assert stopped > token
    s = Setup(tmp_path, daemon_factory, seed, max_size=max_size,
              credentials=sts_cfg(emulator, token, retry_backoff=0.3, retry_backoff_max=1.0))
    d = s.d
    emulator.set_faults([{"op": "UploadPart", "delay_ms": 100}])
    d.start()
    s.batch(files)
    wait_until(lambda: counts(d)["uploading"] > 0, 30, what="uploads in flight")
    d.proc.send_signal(signal.SIGSTOP)
    time.sleep(stopped)   # the outage itself: the daemon is frozen, there is no condition to wait for
    d.proc.send_signal(signal.SIGCONT)
    emulator.clear_faults()
    s.wait_writers()
    wait_converged(d, len(s.expected()), 120, "after SIGCONT")
    figures = s.check()
    d.stop()
    return {"stopped_s": stopped, "token_s": token, **figures}
