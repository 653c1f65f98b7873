"""Ready markers: a settled file waits until its writer says it is complete
(docs/architecture.md §3, "Ready markers").

- ``ready_suffix``: ``x`` goes once ``x`` + suffix exists. The marker is not uploaded
  (unless ``upload_markers``: then it goes after ``x`` is done) and follows ``after_upload``
  with its file.
- ``ready_file``: a folder's files go once the sentinel is in that folder; the sentinel
  itself goes last, once every file of its batch is finished.

A marker vouches for the versions written before it: a file whose mtime is later than the
marker's (rewritten after it, or written after a marker that came first) waits for a new
marker (written again or touched). Copies that keep times (cp -p, rsync -t) keep that
order whatever order they create the two in. A marker still settling vouches for nothing.
The state is `waiting`, with the reason in `error`: never an upload, a failure or an event.

`Gate` is the scheduler's side of these rules (one per watch that sets a key); it sees
the scheduler as `Rescan` does, and decides only on the loop thread.
"""

from __future__ import annotations

import os
import stat as st_
from typing import TYPE_CHECKING

import structlog

from ossyncd.config import WatchConfig
from ossyncd.scanner import Entry, stat_entry
from ossyncd.state import FileRow, printable_path

if TYPE_CHECKING:
    from ossyncd.scheduler import Scheduler

log = structlog.get_logger(__name__)
# what a sentinel's batch needs of each file before the sentinel goes
FINISHED = ("done", "skipped", "gone", "exists")
# released but not started: a removed marker holds these again (Gate.held)
NOT_STARTED = ("queued", "retry_wait")


def _mtime(path: str) -> int | None:
    """The marker's mtime, None when it is not a regular file there."""
    try:
        s = os.lstat(path)
    except OSError:
        return None
    return s.st_mtime_ns if st_.S_ISREG(s.st_mode) else None


class Gate:
    def __init__(self, sched: Scheduler, w: WatchConfig):
        self.sched = sched
        self.w = w
        self.root = str(w.path)
        self.suffix = w.ready_suffix
        self.sentinel = w.ready_file
        self.open_dirs: set[str] = set()   # folders whose sentinel waits for its batch

    # -- names -----------------------------------------------------------------------------

    def is_marker(self, path: str) -> bool:
        name = os.path.basename(path)
        if self.suffix:
            return name.endswith(self.suffix) and len(name) > len(self.suffix)
        return name == self.sentinel

    def marker_of(self, path: str) -> str:
        return path + self.suffix if self.suffix else os.path.join(os.path.dirname(path), self.sentinel)

    # -- decisions -------------------------------------------------------------------------

    def decide(self, path: str, entry: Entry) -> str | None:
        """None when a settled file may go now, else why it waits."""
        marker = self.marker_of(path)
        name = os.path.basename(marker)
        what = f"marker {name}" if self.suffix else f"marker {name} in its folder"
        mtime = _mtime(marker)
        if mtime is None or self.sched.trackers[self.root].settling(marker):
            return f"waiting for {what}"
        if entry.mtime_ns > mtime:
            return f"waiting for marker: changed after {name}; write {name} again to release it"
        return None

    def settled(self, path: str, entry: Entry) -> None:
        """A marker settled: release what it vouches for; a sentinel or an uploaded marker
        gets its own row, waiting for its file(s)."""
        s = self.sched
        if self.suffix:
            base = path[: -len(self.suffix)]
            self.release(base)
            if self.w.upload_markers:
                reason = None if self._done(base) else f"waiting for its file {os.path.basename(base)} to upload"
                s.record(self.root, entry, reason)
            return
        s.record(self.root, entry, "sentinel: waiting for the other files of its folder (it goes last)")
        row = s.state.get(printable_path(path))
        if row is not None and row.state == "waiting":
            self.open_dirs.add(os.path.dirname(path))
            self.check_dir(os.path.dirname(path))

    def release(self, path: str) -> None:
        """A waiting file whose marker is now there goes to the queue."""
        row = self.sched.state.get(printable_path(path))
        if row is None or row.state != "waiting":
            return
        entry = stat_entry(self.w, path)
        if entry is None or entry.kind != "file" or not row.identity.matches(entry.identity):
            return   # it changed: the settle path decides again
        if self.decide(path, entry) is None and self.sched.state.transition(row.id, "queued", identity=row.identity):
            log.debug("released by marker", path=row.path, marker=self.marker_of(path))

    def _done(self, path: str) -> bool:
        row = self.sched.state.get(printable_path(path))
        if row is None or row.state != "done":
            return False
        entry = stat_entry(self.w, path)
        return entry is None or (entry.kind == "file" and row.identity.matches(entry.identity))

    def held(self, row: FileRow) -> bool:
        """At dispatch: a file whose marker was removed since its release is held again
        (`waiting`) instead of uploaded. The watcher reports no deletions, so this is where
        a removal is seen."""
        if self.is_marker(row.path) or row.state not in NOT_STARTED:
            return False   # a marker's own row (uploaded marker, sentinel) needs no marker
        marker = self.marker_of(row.path)
        if _mtime(marker) is not None:
            return False
        name = os.path.basename(marker)
        self.sched.state.transition(row.id, "waiting", error=f"waiting for marker {name} (it was removed)",
                                    identity=row.identity)
        log.info("held: marker removed", path=row.path, marker=marker)
        return True

    def finished(self, row: FileRow) -> None:
        """A file's upload ended (or it went): its uploaded marker, or its folder's sentinel,
        may go."""
        if self.suffix:
            if self.w.upload_markers and self._done(row.path):
                marker = self.sched.state.get(printable_path(row.path + self.suffix))
                if marker is not None and marker.state == "waiting":
                    self.sched.state.transition(marker.id, "queued", identity=marker.identity)
            return
        if os.path.dirname(row.path) in self.open_dirs:
            self.check_dir(os.path.dirname(row.path), release=False)

    def check_open(self) -> None:
        """Every folder whose sentinel waits (housekeeping, now and then: catches what no
        upload outcome reports, e.g. a file of the batch that went `skipped`)."""
        for d in list(self.open_dirs):
            self.check_dir(d)

    def check_dir(self, folder: str, *, release: bool = True) -> None:
        """Release the sentinel's batch; queue the sentinel once every file of the batch is
        finished. A file changed after the sentinel belongs to the next batch. Without
        `release` (after each upload) it stops at the first unfinished file, so a batch of
        n files costs about n log n lookups in all, not n squared."""
        s = self.sched
        sentinel = os.path.join(folder, self.sentinel)
        srow = s.state.get(printable_path(sentinel))
        sentry = stat_entry(self.w, sentinel)
        if srow is None or srow.state != "waiting" or sentry is None or sentry.kind != "file":
            self.open_dirs.discard(folder)
            return
        if not srow.identity.matches(sentry.identity):
            return   # rewritten: it settles again
        complete = True
        try:
            names = os.listdir(folder)
        except OSError:
            return
        for name in names:
            path = os.path.join(folder, name)
            if path == sentinel:
                continue
            entry = stat_entry(self.w, path)
            if entry is None or entry.kind != "file":
                continue   # folders, ignored, temp and skipped names are no part of a batch
            if entry.mtime_ns > sentry.mtime_ns:
                continue   # written after the sentinel: the next batch
            row = s.state.get(printable_path(path))
            if row is not None and row.state == "waiting" and row.identity.matches(entry.identity):
                if not release:
                    return
                s.state.transition(row.id, "queued", identity=row.identity)
                complete = False
            elif row is None or row.state not in FINISHED or not row.identity.matches(entry.identity):
                if not release:
                    return
                complete = False
        if complete and s.state.transition(srow.id, "queued", identity=srow.identity):
            self.open_dirs.discard(folder)
            log.info("sentinel released: its folder is uploaded", path=srow.path)
