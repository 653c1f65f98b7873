"""The chaos suite's mixed workload: files from 0 B up to `max_size` (simple and multipart),
written by cp, rsync, slow appenders and plain writes; some rewritten or deleted while they
upload; temp files that never settle; batches added while the daemon is down.

It keeps what the bucket must hold at the end (`expected`: key -> final bytes), the keys that
must never get an object (`never`), and the bytes legitimately sent more than once
(`legit_extra`: versions replaced and files deleted mid-upload may be sent whole)."""

from __future__ import annotations

import random
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

from tests.helpers import MiB, wait_until

KiB = 1024
WRITERS = ("write", "cp", "rsync", "append")


def sizes(rng: random.Random, n: int, *, threshold: int, part: int, tiny: float = 0.25) -> list[int]:
    """n sizes: empty and tiny files (a `tiny` share), simple ones, the threshold's edges,
    multipart ones."""
    out = []
    for _ in range(n):
        r = rng.random()
        r = r * (1 - tiny) / 0.75 + tiny - 0.25 if r >= tiny else 0.0
        if r < 0.25:
            out.append(rng.choice([0, 1, rng.randint(2, 4 * KiB)]))
        elif r < 0.6:
            out.append(rng.randint(4 * KiB, threshold - 1))
        elif r < 0.7:
            out.append(rng.choice([threshold - 1, threshold, threshold + 1, 3 * part + 1]))
        else:
            out.append(rng.randint(threshold, threshold + 8 * part))
    return out


class Workload:
    def __init__(self, root: Path, prefix: str, seed: int, *, staging: Path, threshold: int, part: int,
                 max_size: int = 64 * MiB, rewrites: bool = True, tiny: float = 0.25):
        self.root, self.prefix, self.staging = root, prefix, staging
        self.rng = random.Random(seed)
        self.threshold, self.part, self.max_size = threshold, part, max_size
        # off for delete and move watches: a rewrite racing the daemon's delete of the uploaded
        # version is the writer's race (the check before the unlink cannot close it)
        self.rewrites = rewrites
        self.tiny = tiny
        self.big_left = 1 if max_size > threshold + 8 * part else 0   # one file of max_size per workload
        self.expected: dict[str, bytes] = {}
        self.never: set[str] = set()
        self.legit_extra = 0
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self._n = 0
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        staging.mkdir(parents=True, exist_ok=True)

    def key(self, rel: str) -> str:
        return self.prefix + rel

    def _name(self, tag: str) -> str:
        with self._lock:
            self._n += 1
            n = self._n
        return f"d{n % 4}/{tag}{n:05d}.bin"

    def _data(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    # ---------------------------------------------------------------- writers
    def write(self, rel: str, data: bytes, how: str) -> None:
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if how == "write":
            dest.write_bytes(data)
        elif how in ("cp", "rsync"):
            src = self.staging / rel.replace("/", "_")
            src.write_bytes(data)
            cmd = ["cp", str(src), str(dest)] if how == "cp" else ["rsync", "-q", str(src), str(dest)]
            subprocess.run(cmd, check=True, timeout=120)
            src.unlink()
        else:   # a slow appender: one open file, written in a few pieces with pauses
            with open(dest, "wb") as f:
                step = max(1, len(data) // 4)
                for i in range(0, max(1, len(data)), step):
                    f.write(data[i:i + step])
                    f.flush()
                    time.sleep(0.05)
        with self._lock:
            self.expected[self.key(rel)] = data

    def _bg(self, fn, *args) -> None:
        def run():
            try:
                fn(*args)
            except BaseException as e:   # surfaced by wait()
                self.errors.append(e)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    # ---------------------------------------------------------------- the mix
    def batch(self, n: int, *, churn: float = 0.1, background: bool = True, only: list[int] | None = None) -> list[str]:
        """n files of mixed sizes and writers (or of the sizes `only`); a `churn` share is
        rewritten or deleted soon after it lands (while it settles or uploads)."""
        keys = []
        todo = list(only) if only is not None else sizes(self.rng, n, threshold=self.threshold, part=self.part,
                                                         tiny=self.tiny)
        if self.big_left and n:
            todo[0], self.big_left = self.max_size, 0
        for size in todo:
            rel = self._name("f")
            how = self.rng.choice(WRITERS) if size <= 8 * MiB else self.rng.choice(("write", "cp"))
            fate = self.rng.random()
            data = self._data(size)
            if fate < churn / 2 and self.rewrites:
                self._bg(self._rewrite_later, rel, data, how)
            elif fate < churn:
                self._bg(self._delete_later, rel, data, how)
            elif background:
                self._bg(self.write, rel, data, how)
            else:
                self.write(rel, data, how)
            keys.append(self.key(rel))
        return keys

    def _rewrite_later(self, rel: str, data: bytes, how: str) -> None:
        self.write(rel, data, how)
        time.sleep(self.rng.uniform(0.05, 1.5))
        new = self._data(self.rng.choice([len(data), self.rng.randint(0, self.threshold * 2)]))
        with self._lock:
            self.legit_extra += len(data)
        self.write(rel, new, "write")

    def _delete_later(self, rel: str, data: bytes, how: str) -> None:
        self.write(rel, data, how)
        time.sleep(self.rng.uniform(0.05, 1.5))
        with self._lock:
            self.expected.pop(self.key(rel), None)
            self.legit_extra += len(data)
        (self.root / rel).unlink(missing_ok=True)   # a delete watch may have removed it already

    def never_settled(self, n: int) -> list[str]:
        """Temp-named files left behind (rsync's .name.XXXXXX, *.part): never uploaded."""
        keys = []
        for i in range(n):
            rel = f"d{i % 4}/.tmp{self.rng.randrange(10**6):06d}.bin.Ab{i:04d}" if i % 2 else f"d{i % 4}/dl{i}.part"
            p = self.root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(self._data(self.rng.randint(0, 64 * KiB)))
            self.never.add(self.key(rel))
            keys.append(self.key(rel))
        return keys

    def wait(self, timeout: float = 120) -> None:
        for t in self.threads:
            t.join(timeout)
        self.threads = [t for t in self.threads if t.is_alive()]
        assert not self.threads, "workload writers still running"
        assert not self.errors, f"workload writer failed: {self.errors[0]!r}"

    def clean(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def counts(d) -> dict[str, int]:
    """Rows per state, read straight from the state DB (cheaper than a `status` process per
    poll; the end-of-scenario checks go through the CLI)."""
    out = dict.fromkeys(("settling", "queued", "uploading", "retry_wait", "done", "failed", "gone"), 0)
    if not d.db.exists():
        return out
    try:
        con = sqlite3.connect(f"file:{d.db}?mode=ro", uri=True, timeout=5)
        try:
            out.update(dict(con.execute("SELECT state, count(*) FROM files GROUP BY state").fetchall()))
        finally:
            con.close()
    except sqlite3.OperationalError:   # the schema is not there yet (first start)
        pass
    return out


def wait_converged(d, n_done: int | None, timeout: float, what: str = "") -> dict:
    """Wait until nothing is settling, queued, uploading or waiting for a retry (and, when
    given, `n_done` rows are done); the daemon must stay alive."""
    def ok():
        assert d.proc.poll() is None, d.output()[-3000:]
        c = counts(d)
        busy = c["settling"] + c["queued"] + c["uploading"] + c["retry_wait"]
        return c if busy == 0 and (n_done is None or c["done"] >= n_done) else None
    return wait_until(ok, timeout, interval=0.5, what=f"converged {what} (log: {d.log_path})")


def sweep_config(**kw) -> dict:
    """[daemon] for chaos: orphans swept fast, rescans often (they find what arrived while down)."""
    return {"rescan_interval": 3.0, "orphan_max_age": 0, "orphan_sweep_interval": 2.0, **kw}


