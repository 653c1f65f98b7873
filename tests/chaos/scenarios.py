"""The chaos scenarios, each a function of its counts: tests/chaos/test_*.py run them at full
size under the `chaos` marker (make chaos), tests/test_chaos_short.py at a small size in
`make test`. Each one runs the daemon as a subprocess against the emulator on the mixed
workload, ends with `invariants.check` and returns its figures for `report.record`."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

from ossyncd import crashpoint
from tests.chaos import invariants
from tests.chaos.workload import Workload, sweep_config, wait_converged
from tests.helpers import MiB, events, fast_upload, wait_until

THRESHOLD = 1 * MiB
PART = 256 * 1024
PARALLEL_PARTS = 4
FILES_IN_FLIGHT = 4
# What one kill may cost: every file in flight re-sends what it had not recorded, at most a whole
# simple file (under the threshold) or its window of parts (docs/architecture.md §4).
PER_KILL = FILES_IN_FLIGHT * max(THRESHOLD, PARALLEL_PARTS * PART)


def upload_cfg(**kw) -> dict:
    return fast_upload(multipart_threshold=THRESHOLD, part_size=PART, parallel_parts=PARALLEL_PARTS,
                       max_files_in_flight=FILES_IN_FLIGHT, **kw)


class Setup:
    """Three watches (keep, delete after upload, move after upload) fed by one workload each."""

    def __init__(self, tmp_path: Path, daemon_factory, seed: int, *, max_size: int, settle: float = 0.3, **sections):
        self.tmp = tmp_path
        self.moved = tmp_path / "moved"
        modes = {"keep": {}, "delete": {"after_upload": "delete"},
                 "move": {"after_upload": "move", "move_to": str(self.moved)}}
        self.loads = {m: Workload(tmp_path / f"drop-{m}", f"{m}/", seed + i, staging=tmp_path / f"staging-{m}",
                                  threshold=THRESHOLD, part=PART, max_size=max_size if m == "keep" else 4 * MiB)
                      for i, m in enumerate(modes)}
        watches = [{"path": str(w.root), "prefix": w.prefix, "settle_seconds": settle, **modes[m]}
                   for m, w in self.loads.items()]
        sections.setdefault("upload", upload_cfg())
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


def _resends(d, sizes: dict[str, int]) -> int:
    """Bytes of files sent whole again because a kill fell between Complete and the commit of
    `done` (their checkpointed upload is gone at restart; docs/verification.md): the one
    documented cost beyond the parts in flight."""
    return sum(sizes.get(e.get("path"), 0) for e in events(d, "checkpointed upload is gone on the server; starting over"))


def _sizes(s: Setup) -> dict[str, int]:
    return {str(w.root / k[len(w.prefix):]): len(v) for w in s.loads.values() for k, v in w.expected.items()}


def kills(tmp_path: Path, daemon_factory, *, random_kills: int, per_point: int, max_size: int, seed: int = 15,
          deadline: float = 600) -> dict:
    """kill -9 at random moments and at every crash point on purpose, with files arriving
    while the daemon is down; then converge and check."""
    rng = random.Random(seed)
    end = time.monotonic() + deadline
    s = Setup(tmp_path, daemon_factory, seed, max_size=max_size)
    d = s.d
    s.batch(12)
    s.loads["keep"].never_settled(4)
    hit: dict[str, int] = {}
    sizes: dict[str, int] = {}
    plan = [None] * random_kills + [p for p in crashpoint.NAMES for _ in range(per_point)]
    rng.shuffle(plan)
    for i, point in enumerate(plan):
        assert time.monotonic() < end, f"kills: deadline passed after {i} kills"
        if i % 3 == 0:
            s.batch(3 + rng.randrange(4))   # arrive while it runs
        if point is None:
            d.start()
            time.sleep(rng.uniform(0.2, 2.0))
        else:
            nth = rng.randint(1, 3) if point != "in_commit" else rng.randint(1, 60)
            d.start(env={"OSSYNCD_CRASHPOINT": f"{point}:{nth}"})
            try:
                wait_until(lambda: d.proc.poll() is not None, 30, interval=0.1, what=f"crash point {point}:{nth}")
            except AssertionError:   # not reached: more work of the kind it needs, then try the next time
                s.batch(4)
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
    missing = [p for p in crashpoint.NAMES if hit.get(p, 0) < 1]
    assert not missing, f"crash points never hit: {missing} (hits {hit})"
    n_kills = len(plan)
    figures = s.check(resend_bound=n_kills * PER_KILL + _resends(d, sizes))
    d.stop()
    return {"kills": n_kills, "crashpoints": fired, **figures}
