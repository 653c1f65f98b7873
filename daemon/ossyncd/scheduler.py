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
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import structlog

from ossyncd import crashpoint
from ossyncd.config import Config, WatchConfig
from ossyncd.errors import StateError
from ossyncd.markers import Gate
from ossyncd.model import Identity
from ossyncd.plan import is_multipart
from ossyncd.prune import Pruner
from ossyncd.rescan import Rescan
from ossyncd.rescan import stamp as _stamp
from ossyncd.scanner import Entry, stat_entry
from ossyncd.settle import WRITTEN, SettleTracker
from ossyncd.state import FileRow, State, printable_path
from ossyncd.uploader import CancelScope, Outcome, Uploader

log = structlog.get_logger(__name__)
MAX_EVENTS_PER_TICK = 20_000
STATUS_EVERY = 1.0
STATE_BACKOFF_MIN, STATE_BACKOFF_MAX = 1.0, 30.0   # seconds between retries of an unusable state DB
FILE_CHECK_EVERY = 2.0                              # seconds between checks that state.db is still ours
ROOT_CHECK_EVERY = 1.0   # seconds between checks that each watch root still exists
DUE_MARGIN = 64          # extra due rows read while multipart files wait for a lane
RESCAN_SLICE = 0.05      # seconds of rescan work per tick: intake, settle and dispatch run between slices
SENTINEL_CHECK_EVERY = 10.0   # seconds between full checks of the folders whose ready_file waits
REFILL_EVERY = 0.02      # seconds between refills of free upload slots during a long intake or settle pass


def _dir_ident(path: str) -> tuple[int, int] | None:
    """(dev, inode) of the folder a watch root names, None when it is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


@dataclass
class _Job:
    row: FileRow
    multipart: bool
    started: float = field(default_factory=time.monotonic)


class Scheduler:
    """Takes what it decides about, nothing more: the state, the uploader, the config (the
    watches), and hooks: `publish` (the credentials status, every STATUS_EVERY), `on_done`
    (row, outcome: metrics), `on_rearm` (watch: restart its event source), `source_alive`
    (watch -> False when its event source died), `source_info` (watch -> how its events
    arrive, shown by `status`: inotify, or polling and why), `credentials_unavailable` (-> the
    error while the last credentials fetch failed and none are usable: the queue is held in
    `retry_wait`, saying why, until a fetch succeeds)."""

    def __init__(self, state: State, uploader: Uploader, cfg: Config, *,
                 publish: Callable[[], None] | None = None,
                 on_done: Callable[[FileRow, Outcome], None] | None = None,
                 on_rearm: Callable[[WatchConfig], None] | None = None,
                 source_alive: Callable[[WatchConfig], bool] | None = None,
                 source_info: Callable[[WatchConfig], dict] | None = None,
                 credentials_unavailable: Callable[[], Exception | None] | None = None):
        self.state = state
        self.uploader = uploader
        self.cfg = cfg
        self.publish = publish
        self.on_done = on_done
        self.on_rearm = on_rearm
        self.source_alive = source_alive
        self.source_info = source_info
        self.credentials_unavailable = credentials_unavailable
        self.intake: queue.SimpleQueue = queue.SimpleQueue()
        self.finished: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.watches: dict[str, WatchConfig] = {}
        self.trackers: dict[str, SettleTracker] = {}
        self.gates: dict[str, Gate] = {}        # root -> its ready-marker rules (ready_suffix / ready_file)
        self.pruner = Pruner()
        self._sentinels_at = float("-inf")
        self.rescan_due: dict[str, float] = {}
        self.rescans: dict[str, Rescan] = {}    # root -> its rescan in progress (run in slices)
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
        self.calls: queue.SimpleQueue = queue.SimpleQueue()   # work for the loop thread (reloads)
        self.health: dict[str, dict] = {}        # root -> {"state", "since", "ident"}, shown by `status`
        self._roots_at = float("-inf")
        self._health_dirty = True
        self.temp_skipped: dict[str, str] = {}   # path -> root: settled files a temp-name rule skipped
        self.state_error: str | None = None     # the state DB problem the loop is backing off from
        self.loop_error: str | None = None      # or the unexpected exception it is backing off from
        self.fatal: StateError | None = None    # the state DB problem that stopped the loop
        self._trouble_text: str | None = None    # the last failed tick's problem, while it persists
        self._failures = 0
        self._health_at = float("-inf")
        self._file_checked = float("-inf")
        self._crashed: list[tuple[FileRow, str]] = []   # rows whose job raised, not recorded yet
        self._refill_at = 0.0
        for w in cfg.watch:
            self.add_watch(w)

    # -- configuration ---------------------------------------------------------------------

    def add_watch(self, w: WatchConfig) -> None:
        root = str(w.path)
        self.watches[root] = w
        self.trackers[root] = SettleTracker(w.settle_seconds)
        self.gates.pop(root, None)
        if w.ready_suffix or w.ready_file:
            self.gates[root] = Gate(self, w)
        self.rescan_due[root] = 0.0   # scan at once
        self.rescans.pop(root, None)  # a fresh tracker: any rescan in progress starts over
        self.health[root] = {"state": "ok", "since": time.time(), "ident": _dir_ident(root)}
        self._health_dirty = True

    def remove_watch(self, w: WatchConfig) -> None:
        root = str(w.path)
        self.watches.pop(root, None)
        self.trackers.pop(root, None)
        self.gates.pop(root, None)
        self.rescan_due.pop(root, None)
        self.rescans.pop(root, None)
        self.health.pop(root, None)
        self._health_dirty = True

    # -- inputs from other threads ---------------------------------------------------------

    def on_event(self, watch, path: str, how: int) -> None:
        self.intake.put((str(watch.path), path, how))
        self.wake.set()

    def request_rescan(self, watch=None, reason: str = "") -> None:
        for root in ([str(watch.path)] if watch is not None else list(self.rescan_due)):
            self.rescan_due[root] = 0.0
        self.wake.set()

    # -- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """The loop. A state DB error that can clear (disk full) backs the loop off and is
        retried; one that cannot (corrupt, deleted) is kept in `self.fatal` and stops the
        daemon. Any other exception is logged and retried the same way: nothing ends the loop
        unseen, and a problem that persists is logged once, not at every retry."""
        while not stop.is_set():
            now = time.time()
            try:
                self.tick(now)
            except StateError as e:
                if not e.clearable:
                    self.fatal = e
                    stop.set()
                    return
                self._wait_backoff(stop, self._trouble(e, state=True))
                continue
            except Exception as e:  # a bug: seen in the log, and the daemon keeps working
                self._wait_backoff(stop, self._trouble(e, state=False))
                continue
            self._healthy()
            if not self.rescans:   # a rescan in progress goes on at once: its slices bound the tick
                self.wake.wait(max(0.01, min(0.5, self.next_wakeup(now) - time.time())))
            self.wake.clear()

    def _trouble(self, e: Exception, *, state: bool) -> float:
        """Record a failed tick (logged once while the same problem persists); return the
        backoff delay before the next try."""
        text = f"{e}; the daemon retries every {STATE_BACKOFF_MIN:g}..{STATE_BACKOFF_MAX:g} s" if state else repr(e)
        if text != self._trouble_text:
            if state:
                log.error("state DB unusable; uploads wait", error=text)
            else:
                log.exception("scheduler tick crashed; retrying", error=text)
        self._trouble_text = text
        self.state_error = text if state else None
        self.loop_error = None if state else text
        delay = min(STATE_BACKOFF_MAX, STATE_BACKOFF_MIN * 2 ** self._failures)
        self._failures += 1
        self._write_health()
        return delay

    def _healthy(self) -> None:
        """After a good tick: if earlier ones failed, settle decisions held in memory may never
        have reached state, so start them over from the disk, as a restart would."""
        if self._trouble_text is not None:
            if self.state_error is not None:
                log.info("state DB usable again; uploads continue", was=self.state_error)
            self._trouble_text = self.state_error = self.loop_error = None
            self._failures = 0
            for w in list(self.watches.values()):
                self.add_watch(w)   # a fresh tracker, rescanned at once
            self._write_health()
        elif time.monotonic() - self._health_at >= STATUS_EVERY:
            self._write_health()

    def _write_health(self) -> None:
        self._health_at = time.monotonic()
        self.state.write_health({"heartbeat_at": time.time(), "state_error": self.state_error,
                                 "loop_error": self.loop_error, "state_retries": self._failures})

    def _wait_backoff(self, stop: threading.Event, delay: float) -> None:
        """Sleep `delay`, still ticking for the watchdog: a loop in backoff is not stuck, and a
        restart cannot free a disk (it would only run into the start limit)."""
        end = time.monotonic() + delay
        while not stop.is_set() and time.monotonic() < end:
            self.last_tick = time.monotonic()
            self._write_health()
            stop.wait(min(0.5, max(0.0, end - time.monotonic())))

    def next_wakeup(self, now: float) -> float:
        if self.rescans:
            return now   # the next slice of a rescan
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
        if self.last_tick - self._file_checked >= FILE_CHECK_EVERY:
            self._file_checked = self.last_tick
            self.state.check_file()
        while not self.calls.empty():
            self.calls.get_nowait()()
        self._record_crashes()
        self._reap()
        self._drain_intake(now)
        self._settle(now)
        self._housekeeping(now)
        self._rescan(now)
        self._check_pause()
        self._dispatch(now)
        self._publish(now)

    # -- stages ----------------------------------------------------------------------------

    def _drain_intake(self, now: float) -> None:
        # A copied file comes as create, modify and close: one stat per path per drain serves
        # all three (the restat after settling catches a write the shared stat missed).
        stats: dict[tuple[str, str], Entry | None] = {}
        for _ in range(MAX_EVENTS_PER_TICK):
            try:
                root, path, how = self.intake.get_nowait()
            except queue.Empty:
                return
            self._consider(root, path, now, how, stats)
            self._refill(now)

    def _consider(self, root: str, path: str, now: float, how: int,
                  stats: dict[tuple[str, str], Entry | None] | None = None) -> None:
        w = self.watches.get(root)
        if w is None:
            return
        if stats is None:
            entry = stat_entry(w, path)
        elif (root, path) in stats:
            entry = stats[root, path]
        else:
            entry = stats[root, path] = stat_entry(w, path)
        if entry is None:
            self.trackers[root].forget(path)
            return
        if entry.kind == "skipped":
            self.state.mark_skipped(entry.path, root, entry.reason)
            log.warning("skipped", path=entry.path, reason=entry.reason)
            return
        self.trackers[root].observe(entry.path, entry.size, _stamp(entry), now, how)

    def _settle(self, now: float) -> None:
        for root, tracker in self.trackers.items():
            w = self.watches[root]
            for path in tracker.ready(now):
                self._refill(now)
                entry = stat_entry(w, path, with_temp=True)
                if entry is None or entry.kind == "skipped":
                    tracker.confirm(path, None, None, now)
                    if entry is not None:
                        self.state.mark_skipped(entry.path, root, entry.reason)
                    continue
                if not tracker.confirm(path, entry.size, _stamp(entry), now):
                    continue
                if entry.kind == "temp":
                    self._skip_temp(root, entry)
                    continue
                if any(j.row.path == path for j in self.jobs.values()):
                    self.deferred.add(path)
                    continue
                gate = self.gates.get(root)
                if gate is not None and gate.is_marker(path):
                    gate.settled(path, entry)
                    continue
                self.record(root, entry, gate.decide(path, entry) if gate is not None else None)

    def _refill(self, now: float) -> None:
        """Inside a long intake or settle pass (thousands of files dropped at once): every
        REFILL_EVERY, record finished uploads and hand their slots the queued files, so the
        uploads do not wait for the pass to end (docs/architecture.md §1)."""
        t = time.monotonic()
        if t < self._refill_at:
            return
        self._refill_at = t + REFILL_EVERY
        if not self.finished.empty():
            self._reap()
            self._dispatch(now)

    def record(self, root: str, entry: Entry, waiting: str | None) -> None:
        """A settled version: queued, or `waiting` for its ready marker (the reason)."""
        row, new = self.state.observe(entry.path, root, entry.key, entry.identity,
                                      state="queued" if waiting is None else "waiting")
        if waiting is not None and (row.state, row.error) != ("waiting", waiting) and (
                new or row.state in ("settling", "waiting")):
            self.state.transition(row.id, "waiting", error=waiting, identity=row.identity)
            log.debug("waiting for marker", path=entry.path, reason=waiting)
        elif waiting is None and not new and row.state in ("settling", "waiting"):
            self.state.transition(row.id, "queued", identity=row.identity)
        elif new:
            log.debug("queued", path=entry.path, key=entry.key, size=entry.size)

    def _skip_temp(self, root: str, entry) -> None:
        """A temp name still there after settling may be a real file: show it in `list`."""
        self.state.mark_skipped(entry.path, root, entry.reason)
        if entry.path not in self.temp_skipped:
            log.warning("skipped", path=entry.path, reason=entry.reason)
        self.temp_skipped[entry.path] = root

    def _check_temps(self) -> None:
        """A temp file renamed to its final name leaves no `skipped` row behind for `status`."""
        for path, root in list(self.temp_skipped.items()):
            if root in self.watches and os.path.lexists(path):
                continue
            del self.temp_skipped[path]
            row = self.state.get(printable_path(path))
            if row is not None and row.state == "skipped":
                self._gone(row.path, "temp file renamed or removed")

    def _housekeeping(self, now: float) -> None:
        if now - self._roots_at < ROOT_CHECK_EVERY:
            return
        self._roots_at = now
        self._check_roots(now)
        self._check_temps()
        self.pruner.tick(self.watches, now)
        if now - self._sentinels_at >= SENTINEL_CHECK_EVERY:
            self._sentinels_at = now
            for gate in self.gates.values():
                gate.check_open()

    def _check_roots(self, now: float) -> None:
        """A deleted watch root loses its inotify watch: show it in `status`, and re-arm the
        watch once the folder is back (also when it was replaced between two checks)."""
        for root, h in self.health.items():
            source = self.source_info(self.watches[root]) if self.source_info is not None else {}
            if source != h.get("source", {}):   # e.g. fell back to polling at an inotify limit
                h["source"] = source
                self._health_dirty = True
            ident = _dir_ident(root)
            if ident == h["ident"]:
                if ident is None or self.source_alive is None or self.source_alive(self.watches[root]):
                    continue
                log.error("watch_source_died", path=root, hint="re-armed now; the thread_crashed line says why")
            self._health_dirty = True
            if ident is None:
                h.update(state="missing", since=now, ident=None)
                log.error("watch_root_missing", path=root,
                          hint="recreate the folder; the watch is re-armed when it reappears, no restart needed")
                continue
            h.update(state="ok", since=now, ident=ident)
            try:
                if self.on_rearm is not None:
                    self.on_rearm(self.watches[root])
            except Exception as e:   # e.g. an inotify limit: try again at the next check
                h.update(state="failed", ident=None, error=str(e))
                log.error("watch_rearm_failed", path=root, error=str(e), hint="see the error; retried every second")
                continue
            h.pop("error", None)
            log.warning("watch_root_rearmed", path=root)
            self.rescan_due[root] = 0.0   # files that arrived with the folder
        if self._health_dirty:
            self._health_dirty = False
            self.state.set_meta("watches", json.dumps(
                [{"index": self.watches[r].index, "path": r, "state": h["state"], "since": h["since"],
                  **h.get("source", {}), **({"error": h["error"]} if "error" in h else {})}
                 for r, h in self.health.items()]))

    def _rescan(self, now: float) -> None:
        """Start the rescans that are due, then run those in progress for one slice."""
        for root, due in list(self.rescan_due.items()):
            if root in self.rescans or due > now or self.health.get(root, {}).get("state") != "ok":
                continue
            self.rescan_due[root] = now + self.cfg.daemon.rescan_interval
            self.rescans[root] = Rescan(self, root)
        deadline = time.monotonic() + RESCAN_SLICE
        for root, scan in list(self.rescans.items()):
            if self.health.get(root, {}).get("state") != "ok":
                del self.rescans[root]   # the root is gone; it is rescanned when it is back
                continue
            try:
                done = scan.step(now, deadline)
            except BaseException:
                del self.rescans[root]   # a generator that raised cannot go on; the loop rescans on recovery
                raise
            if done:
                del self.rescans[root]

    def scan_root(self, root: str, now: float) -> Rescan:
        """Reconcile one root with state at once; the Rescan says what it held."""
        self.rescans.pop(root, None)
        scan = Rescan(self, root)
        scan.run(now)
        return scan

    def _gone(self, path: str, reason: str) -> None:
        row = self.state.get(path)
        if row is None:
            return
        self.uploader.give_up_upload(row)
        self.state.transition(row.id, "gone", error=reason)
        log.info("gone", path=path, reason=reason)
        if row.watch in self.gates:
            self.gates[row.watch].finished(row)

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
        err = self.credentials_unavailable() if self.credentials_unavailable is not None else None
        if err is not None:   # each job would fail at once and churn its row through `uploading`
            for path in self.state.hold_queued(f"waiting for credentials: {err}", now):   # due once they are back
                log.warning("credentials unavailable", path=path, error=str(err))   # once per file and outage
            return
        slots = self.cfg.upload.max_files_in_flight - len(self.jobs)
        if slots <= 0:
            return
        big_limit = max(1, self.cfg.upload.max_files_in_flight - 1)
        big = sum(1 for j in self.jobs.values() if j.multipart)
        # rows of finished jobs not reaped yet may still be due; multipart rows past the limit are passed over
        margin = len(self.jobs) + (DUE_MARGIN if big >= big_limit - 1 else 0)
        picked: list[tuple[FileRow, bool]] = []
        for row in self.state.due(now, limit=slots + margin):
            if slots <= 0:
                break
            if row.id in self.jobs or row.watch not in self.watches:
                continue
            if row.watch in self.gates and self.gates[row.watch].held(row):
                continue
            multipart = is_multipart(row.size, self.cfg.upload)
            if multipart and big >= big_limit:
                continue
            big += multipart
            slots -= 1
            picked.append((row, multipart))
        self._start_jobs(picked)

    def _start_jobs(self, picked: list[tuple[FileRow, bool]]) -> None:
        """Move the picked rows to `uploading` in one transaction, then hand them to the pool."""
        if not picked:
            return
        claimed = self.state.start_uploads([row for row, _ in picked])
        for row, multipart in picked:
            if row.id not in claimed:   # a newer version was seen since the due query
                continue
            self.jobs[row.id] = _Job(row, multipart)
            fut = self.file_pool.submit(self.uploader.run, row, self.scope, claimed=True)
            fut.add_done_callback(partial(self._finished, row))

    def _finished(self, row: FileRow, fut) -> None:
        if fut.cancelled():   # never started (shutdown): left `uploading`, queued again at the next start
            return
        exc = fut.exception()
        outcome = Outcome("retry_wait", f"internal error: {exc!r}") if exc else fut.result()
        if exc is not None:
            log.error("upload crashed", path=row.path, error=str(exc) if isinstance(exc, StateError) else repr(exc))
        self.finished.put((row, outcome, exc))
        self.wake.set()

    def _record_crashes(self) -> None:
        """Rows whose job raised go to retry_wait, never left `uploading` where nothing would
        pick them up again. On the loop thread, so a state error here backs the loop off and
        the row stays listed until it is recorded."""
        while self._crashed and not self.stopping:   # when stopping, the restart requeues them
            row, error = self._crashed[0]
            self.state.transition(row.id, "retry_wait", error=f"upload interrupted: {error}", identity=row.identity,
                                  next_attempt_at=time.time() + self.cfg.upload.file_retry_delay)
            self._crashed.pop(0)

    def _reap(self) -> None:
        while True:
            try:
                row, outcome, exc = self.finished.get_nowait()
            except queue.Empty:
                return
            self.jobs.pop(row.id, None)
            if exc is not None:
                self._crashed.append((row, str(exc) if isinstance(exc, StateError) else repr(exc)))
            if outcome.state == "done":
                if not outcome.unchanged:
                    self.uploaded_bytes += row.size
                self._after_upload(row)
            elif outcome.state == "queued" and not outcome.cancelled:
                # the file changed: let it settle again before the next attempt
                self.state.transition(row.id, "settling", identity=row.identity)
                self._consider(row.watch, row.path, time.time(), WRITTEN)
            if row.path in self.deferred:
                self.deferred.discard(row.path)
                self._consider(row.watch, row.path, time.time(), WRITTEN)
            if row.watch in self.gates:
                self.gates[row.watch].finished(row)
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
        if not row.identity.matches(Identity.of(st)):
            log.info("source changed after upload; kept", path=row.path)
            return
        if not self._act(w, row.path):
            return
        if w.ready_suffix and not w.upload_markers and os.path.isfile(row.path + w.ready_suffix):
            self._act(w, row.path + w.ready_suffix)   # a marker not uploaded follows its file
        if w.prune_empty_dirs:
            self.pruner.emptied(w, row.path)

    def _act(self, w: WatchConfig, path: str) -> bool:
        """Delete or move one source; False (logged) when it stays."""
        try:
            crashpoint.hit("after_upload_action")
            if w.after_upload == "delete":
                os.unlink(path)
                log.info("source deleted after verified upload", path=path)
            else:
                dest = w.move_to / os.path.relpath(path, w.path)  # type: ignore[operator]  # config: move needs move_to
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(path, dest)
                log.info("source moved after verified upload", path=path, to=str(dest))
        except OSError as e:
            log.error("after_upload failed; the source stays", path=path, action=w.after_upload,
                      error=e.strerror)
            return False
        return True

    def _publish(self, now: float) -> None:
        if now - self._status_at < STATUS_EVERY:
            return
        self._status_at = now
        if self.publish is not None:
            self.publish()
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
            try:
                self._reap()
            except StateError as e:   # e.g. the fatal error that stops the daemon; the restart requeues
                log.warning("uploads not recorded at stop; the restart requeues them", error=str(e))
                break
            time.sleep(0.05)
        self.file_pool.shutdown(wait=False, cancel_futures=True)
