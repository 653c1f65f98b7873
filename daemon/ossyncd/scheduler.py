"""The daemon's brain: intake (watcher events, rescans) -> settle -> queue -> uploads.

One loop thread owns every decision; `tick(now)` is one pass, so tests can drive it.
Uploads run on a file pool of `max_files_in_flight` threads, their parts on the shared
part pool of `parallel_parts` threads (the global budget). Fairness: multipart files
may hold at most all but one file slot, so small files always have a lane, and a big
file keeps its slot once started, so a stream of small files cannot starve it.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from ossyncd.config import Config, WatchConfig
from ossyncd.engine import Engine
from ossyncd.errors import StoreError
from ossyncd.plan import is_multipart
from ossyncd.scanner import scan_root, stat_entry
from ossyncd.settle import SettleTracker
from ossyncd.state import FileRow, printable_path
from ossyncd.uploader import CancelScope, Outcome

log = structlog.get_logger(__name__)
MAX_EVENTS_PER_TICK = 20_000
STATUS_EVERY = 1.0


@dataclass
class _Job:
    row: FileRow
    multipart: bool
    started: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(self, engine: Engine, cfg: Config):
        self.engine = engine
        self.state = engine.state
        self.cfg = cfg
        self.intake: queue.SimpleQueue = queue.SimpleQueue()
        self.finished: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.watches: dict[str, WatchConfig] = {}
        self.trackers: dict[str, SettleTracker] = {}
        self.rescan_due: dict[str, float] = {}
        self.jobs: dict[int, _Job] = {}
        self.deferred: set[str] = set()         # settled while an older version was uploading
        self.file_pool = ThreadPoolExecutor(cfg.upload.max_files_in_flight, thread_name_prefix="file")
        self.scope = CancelScope()
        self.paused = False
        self.stopping = False
        self.last_tick = time.monotonic()
        self._status_at = 0.0
        self._bytes_done_window: list[tuple[float, int]] = []
        self.uploaded_bytes = 0
        self.on_done = None                      # hook: (row, outcome) for metrics
        self.calls: queue.SimpleQueue = queue.SimpleQueue()   # work for the loop thread (reloads)
        for w in cfg.watch:
            self.add_watch(w)
        self._creds_lock = threading.Lock()
        engine.credentials.on_change = self._publish_credentials

    def _publish_credentials(self) -> None:
        """After every credentials fetch and every STATUS_EVERY. Read and written under one lock,
        so an older status never overwrites a newer one."""
        with self._creds_lock:
            self.state.set_meta("credentials", json.dumps(self.engine.credentials.status()))

    # -- configuration ---------------------------------------------------------------------

    def add_watch(self, w: WatchConfig) -> None:
        root = str(w.path)
        self.watches[root] = w
        self.trackers[root] = SettleTracker(w.settle_seconds)
        self.rescan_due[root] = 0.0   # scan at once

    def remove_watch(self, w: WatchConfig) -> None:
        root = str(w.path)
        self.watches.pop(root, None)
        self.trackers.pop(root, None)
        self.rescan_due.pop(root, None)

    # -- inputs from other threads ---------------------------------------------------------

    def on_event(self, watch, path: str, closed: bool) -> None:
        self.intake.put((str(watch.path), path, closed))
        self.wake.set()

    def request_rescan(self, watch=None, reason: str = "") -> None:
        for root in ([str(watch.path)] if watch is not None else list(self.rescan_due)):
            self.rescan_due[root] = 0.0
        self.wake.set()

    # -- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            now = time.time()
            self.tick(now)
            self.wake.wait(max(0.01, min(0.5, self.next_wakeup(now) - time.time())))
            self.wake.clear()

    def next_wakeup(self, now: float) -> float:
        times = [now + 0.5]
        for t in self.trackers.values():
            d = t.next_deadline()
            if d is not None:
                times.append(d)
        return min(times)

    def call_soon(self, fn) -> None:
        """Run fn() on the loop thread (config reloads touch the loop's own structures)."""
        self.calls.put(fn)
        self.wake.set()

    def tick(self, now: float) -> None:
        self.last_tick = time.monotonic()
        while not self.calls.empty():
            self.calls.get_nowait()()
        self._reap()
        self._drain_intake(now)
        self._settle(now)
        self._rescan(now)
        self._check_pause()
        self._dispatch(now)
        self._publish(now)

    # -- stages ----------------------------------------------------------------------------

    def _drain_intake(self, now: float) -> None:
        for _ in range(MAX_EVENTS_PER_TICK):
            try:
                root, path, closed = self.intake.get_nowait()
            except queue.Empty:
                return
            self._consider(root, path, now, closed)

    def _consider(self, root: str, path: str, now: float, closed: bool) -> None:
        w = self.watches.get(root)
        if w is None:
            return
        entry = stat_entry(w, path)
        if entry is None:
            self.trackers[root].forget(path)
            return
        if entry.kind == "skipped":
            self.state.mark_skipped(entry.path, root, entry.reason)
            log.warning("skipped", path=entry.path, reason=entry.reason)
            return
        self.trackers[root].observe(entry.path, entry.size, entry.mtime_ns, now, closed)

    def _settle(self, now: float) -> None:
        for root, tracker in self.trackers.items():
            w = self.watches[root]
            for path in tracker.ready(now):
                entry = stat_entry(w, path)
                if entry is None or entry.kind != "file":
                    tracker.confirm(path, None, None, now)
                    if entry is not None:
                        self.state.mark_skipped(entry.path, root, entry.reason)
                    continue
                if not tracker.confirm(path, entry.size, entry.mtime_ns, now):
                    continue
                if any(j.row.path == path for j in self.jobs.values()):
                    self.deferred.add(path)
                    continue
                row, new = self.state.observe(path, root, entry.key, entry.size, entry.mtime_ns, entry.inode)
                if not new and row.state == "settling":
                    self.state.transition(row.id, "queued", identity=row.identity)
                if new:
                    log.debug("queued", path=path, key=entry.key, size=entry.size)

    def _rescan(self, now: float) -> None:
        for root, due in list(self.rescan_due.items()):
            if due > now:
                continue
            self.rescan_due[root] = now + self.cfg.daemon.rescan_interval
            self.scan_root(root, now)

    def scan_root(self, root: str, now: float) -> None:
        """Reconcile one root with state: new or changed files settle, vanished ones go."""
        w = self.watches[root]
        t0 = time.monotonic()
        known = self.state.known_identities(root)
        seen: set[str] = set()
        tracker = self.trackers[root]
        unreadable_root = False
        for entry in scan_root(w):
            if entry.kind == "skipped":
                stored = printable_path(entry.path)   # how state keys a non-UTF-8 name
                seen.add(stored)
                if entry.path == root:
                    unreadable_root = True
                k = known.get(stored)
                if not (k and k[0] == "skipped"):
                    self.state.mark_skipped(entry.path, root, entry.reason)
                    log.warning("skipped", path=entry.path, reason=entry.reason)
                continue
            seen.add(entry.path)
            k = known.get(entry.path)
            if k is not None and k[1] == (entry.size, entry.mtime_ns, entry.inode) and k[0] not in ("gone", "skipped"):
                if k[0] == "settling":
                    tracker.observe(entry.path, entry.size, entry.mtime_ns, now, False)
                continue
            tracker.observe(entry.path, entry.size, entry.mtime_ns, now, False)
        if unreadable_root:
            return
        in_flight = {j.row.path for j in self.jobs.values()}
        for path, (st, _) in known.items():
            if path in seen or path in in_flight or st in ("done", "gone"):
                continue
            tracker.forget(path)
            self._gone(path, "vanished before it was uploaded")
        log.info("rescan", root=root, files=len(seen), seconds=round(time.monotonic() - t0, 3))

    def _gone(self, path: str, reason: str) -> None:
        row = self.state.get(path)
        if row is None:
            return
        up = self.state.upload_for(row.id)
        if up is not None:
            try:
                self.engine.store.abort(up.key, up.upload_id)
            except StoreError as e:
                log.warning("abort failed", key=up.key, error=str(e))
            self.state.drop_upload(up.id)
        self.state.transition(row.id, "gone", error=reason)
        log.info("gone", path=path, reason=reason)

    def _check_pause(self) -> None:
        paused = self.state.get_meta("paused") == "1"
        if paused and not self.paused:
            log.info("paused: cancelling in-flight parts; checkpoints are kept")
            self.scope.set()
        elif not paused and self.paused:
            log.info("resumed")
            self.scope = CancelScope()
        self.paused = paused

    def _dispatch(self, now: float) -> None:
        if self.paused or self.stopping:
            return
        slots = self.cfg.upload.max_files_in_flight - len(self.jobs)
        if slots <= 0:
            return
        big_limit = max(1, self.cfg.upload.max_files_in_flight - 1)
        big = sum(1 for j in self.jobs.values() if j.multipart)
        for row in self.state.due(now, limit=slots + len(self.jobs) + 64):
            if slots <= 0:
                break
            if row.id in self.jobs or row.watch not in self.watches:
                continue
            multipart = is_multipart(row.size, self.cfg.upload)
            if multipart and big >= big_limit:
                continue
            big += multipart
            slots -= 1
            self.jobs[row.id] = _Job(row, multipart)
            fut = self.file_pool.submit(self.engine.uploader.run, row, self.scope)
            fut.add_done_callback(lambda f, row=row: self._finished(row, f))

    def _finished(self, row: FileRow, fut) -> None:
        exc = fut.exception()
        outcome = Outcome("retry_wait", f"internal error: {exc!r}") if exc else fut.result()
        if exc is not None:
            log.error("upload crashed", path=row.path, error=repr(exc))
            try:  # never leave the row `uploading`, where nothing would pick it up again
                self.state.transition(row.id, "retry_wait", error=outcome.error, identity=row.identity,
                                      next_attempt_at=time.time() + self.cfg.upload.file_retry_delay)
            except Exception as e:  # the state DB itself failed; the restart path requeues it
                log.error("cannot record the crash", path=row.path, error=repr(e))
        self.finished.put((row, outcome))
        self.wake.set()

    def _reap(self) -> None:
        while True:
            try:
                row, outcome = self.finished.get_nowait()
            except queue.Empty:
                return
            self.jobs.pop(row.id, None)
            if outcome.state == "done":
                self.uploaded_bytes += row.size
                self._after_upload(row)
            elif outcome.state == "queued" and outcome.error not in ("cancelled",):
                # the file changed: let it settle again before the next attempt
                self.state.transition(row.id, "settling", identity=row.identity)
                self._consider(row.watch, row.path, time.time(), False)
            if row.path in self.deferred:
                self.deferred.discard(row.path)
                self._consider(row.watch, row.path, time.time(), False)
            if self.on_done is not None:
                self.on_done(row, outcome)

    def _after_upload(self, row: FileRow) -> None:
        w = self.watches.get(row.watch)
        if w is None or w.after_upload == "keep":
            return
        try:
            st = os.stat(row.path, follow_symlinks=False)
        except FileNotFoundError:
            return
        if (st.st_size, st.st_mtime_ns, st.st_ino) != row.identity:
            log.info("source changed after upload; kept", path=row.path)
            return
        try:
            if w.after_upload == "delete":
                os.unlink(row.path)
                log.info("source deleted after verified upload", path=row.path)
            else:
                dest = w.move_to / os.path.relpath(row.path, w.path)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(row.path, dest)
                log.info("source moved after verified upload", path=row.path, to=str(dest))
        except OSError as e:
            log.error("after_upload failed; the source stays", path=row.path, action=w.after_upload,
                      error=e.strerror)

    def _publish(self, now: float) -> None:
        if now - self._status_at < STATUS_EVERY:
            return
        self._status_at = now
        self._publish_credentials()
        rows = [self.state.get_by_id(j.row.id) for j in self.jobs.values()]
        done = self.uploaded_bytes + sum(r.bytes_done for r in rows if r is not None)
        self._bytes_done_window = [(t, b) for t, b in self._bytes_done_window if now - t <= 10] + [(now, done)]
        t0, b0 = self._bytes_done_window[0]
        rate = (done - b0) / 1048576 / (now - t0) if now > t0 else 0.0
        self.state.set_meta("throughput", json.dumps(round(max(rate, 0.0), 2)))
        self.throughput = rate

    # -- shutdown --------------------------------------------------------------------------

    def shutdown(self, timeout: float = 10.0) -> None:
        self.stopping = True
        self.scope.set()
        deadline = time.monotonic() + timeout
        while self.jobs and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        self.file_pool.shutdown(wait=False, cancel_futures=True)
