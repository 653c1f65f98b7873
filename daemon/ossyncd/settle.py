"""When is a file finished? Pure logic; the caller passes stats and the clock.

A path is ready when either
  * it was renamed into place (``RENAMED``: a rename is atomic, the file is whole under its
    final name) after its last change: at once, or
  * it was reported closed (``CLOSED``: IN_CLOSE_WRITE) after its last change and nothing
    happened for ``close_quiet`` seconds, or
  * nothing happened to it (no event, same size and mtime) for ``settle_seconds``.

A path that changes again after a close belongs to a writer that closes and
reopens, so for it a close no longer shortcuts: it needs the full settle time.

Use::

    tracker.observe(path, st.st_size, st.st_mtime_ns, now, how)      # per event
    for path in tracker.ready(now):                                  # at next_deadline()
        st = lstat(path) or None
        if tracker.confirm(path, st and st.st_size, st and st.st_mtime_ns, now):
            enqueue(path)
    tracker.forget(path)                                             # gone / handled

``mtime_ns`` is only compared for equality: the scheduler passes (mtime_ns, ctime_ns),
so a change that restores the mtime (``cp -p``, ``chmod``) still counts as a change.

``ready`` hands each settled version out once; ``confirm`` is the restat check
(a differing stat counts as a new change and the path settles again).
Handed-out paths are kept ``retention`` seconds so a reopen is still noticed,
then dropped, so memory stays bounded without calls to ``forget``.
"""

from __future__ import annotations

import heapq
from collections import deque

# how an event saw the file (``how`` below): a write, a close after writing, a rename into place
WRITTEN, CLOSED, RENAMED = 0, 1, 2


class _Rec:
    __slots__ = ("size", "mtime_ns", "last_event", "how", "reopened", "handed_out", "scheduled")

    def __init__(self, size: int, mtime_ns, now: float, how: int):
        self.size = size
        self.mtime_ns = mtime_ns
        self.last_event = now
        self.how = how
        self.reopened = False
        self.handed_out: float | None = None  # when ready() returned it
        self.scheduled: float | None = None  # deadline of its live heap entry


class SettleTracker:
    def __init__(self, settle_seconds: float, *, close_quiet: float | None = None, retention: float | None = None):
        if settle_seconds < 0:
            raise ValueError("settle_seconds must be >= 0")
        self.settle = float(settle_seconds)
        # Some writers close and reopen at once; a short quiet period covers them.
        self.close_quiet = min(0.2, self.settle) if close_quiet is None else float(close_quiet)
        self.retention = max(60.0, 10 * self.settle) if retention is None else float(retention)
        self._recs: dict[str, _Rec] = {}
        self._heap: list[tuple[float, int, str]] = []  # lazy: stale entries skipped on pop
        self._handed: deque[tuple[float, str]] = deque()  # (handed-out time, path), in time order
        self._seq = 0

    def __len__(self) -> int:
        """Paths still settling (not yet handed out)."""
        return sum(1 for r in self._recs.values() if r.handed_out is None)

    def _deadline(self, rec: _Rec) -> float:
        if rec.reopened or rec.how == WRITTEN:
            quiet = self.settle
        else:   # a writer that closes and reopens at once is covered by close_quiet; a rename is final
            quiet = 0.0 if rec.how == RENAMED else self.close_quiet
        return rec.last_event + quiet

    def _schedule(self, path: str, rec: _Rec) -> None:
        d = self._deadline(rec)
        # One live entry per path; a later deadline is found when the earlier pops.
        if rec.scheduled is None or d < rec.scheduled:
            rec.scheduled = d
            self._seq += 1
            heapq.heappush(self._heap, (d, self._seq, path))

    def observe(self, path: str, size: int, mtime_ns: object, now: float, how: int = WRITTEN) -> None:
        """Record an event (or a scan sighting) for ``path`` with its current stat."""
        rec = self._recs.get(path)
        if rec is None:
            rec = self._recs[path] = _Rec(size, mtime_ns, now, how)
            self._schedule(path, rec)
            return
        changed = size != rec.size or mtime_ns != rec.mtime_ns
        if rec.handed_out is not None and not changed:
            return  # same version already handed out: nothing new
        if changed:
            if rec.how != WRITTEN or rec.handed_out is not None:
                rec.reopened = True
            rec.size, rec.mtime_ns = size, mtime_ns
            rec.handed_out = None
            rec.how = how
        elif how > rec.how:
            rec.how = how
        # else: an event that changed nothing (a duplicate, a rescan sighting)
        # keeps the close: writes move mtime or size.
        rec.last_event = now
        self._schedule(path, rec)

    def settling(self, path: str) -> bool:
        """True while ``path`` is tracked and its current version not handed out yet."""
        rec = self._recs.get(path)
        return rec is not None and rec.handed_out is None

    def forget(self, path: str) -> None:
        self._recs.pop(path, None)

    def ready(self, now: float) -> list[str]:
        """Paths settled by ``now``; each settled version is returned once."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            d, _, path = heapq.heappop(heap)
            rec = self._recs.get(path)
            if rec is None or rec.scheduled != d or rec.handed_out is not None:
                continue  # stale entry
            rec.scheduled = None
            true_d = self._deadline(rec)
            if true_d > now:
                self._schedule(path, rec)
                continue
            rec.handed_out = now
            self._handed.append((now, path))
            out.append(path)
        self._expire(now)
        return out

    def confirm(self, path: str, size: int | None, mtime_ns: object, now: float) -> bool:
        """The caller's restat of a ready path. True when it still matches the
        settled version; None stat (vanished) forgets it; a change re-settles."""
        rec = self._recs.get(path)
        if size is None or mtime_ns is None:
            self.forget(path)
            return False
        if rec is None:
            return False
        if size == rec.size and mtime_ns == rec.mtime_ns:
            return True
        self.observe(path, size, mtime_ns, now, WRITTEN)
        return False

    def next_deadline(self) -> float | None:
        """When ready() may next return something; None when nothing settles."""
        heap = self._heap
        while heap:
            d, _, path = heap[0]
            rec = self._recs.get(path)
            heapq.heappop(heap)
            if rec is None or rec.scheduled != d or rec.handed_out is not None:
                continue  # stale
            rec.scheduled = None
            self._schedule(path, rec)  # re-pushed at its true (maybe later) deadline
            if rec.scheduled == d:
                return d
        return None

    def _expire(self, now: float) -> None:
        handed = self._handed
        while handed and handed[0][0] + self.retention <= now:
            t, path = handed.popleft()
            rec = self._recs.get(path)
            if rec is not None and rec.handed_out == t:
                del self._recs[path]
