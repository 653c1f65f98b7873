"""One reconciliation of a watch root with the state DB, streamed (docs/architecture.md §3).

The walk comes a directory at a time (`scanner.scan_dirs`); each folder's entries are
sorted the way SQLite orders paths and merged with a paged cursor over that folder's rows
(`State.child_rows`). So a rescan holds one folder's entries and one page of rows, never
the tree or the table. The scheduler runs it in slices between its other stages
(`step`), so uploads and detection go on while a big tree is walked.
"""

from __future__ import annotations

import time
from operator import itemgetter
from typing import TYPE_CHECKING, Iterator

import structlog

from ossyncd import crashpoint
from ossyncd.scanner import DirGroup, Entry, scan_dirs
from ossyncd.settle import WRITTEN
from ossyncd.state import KnownRow, printable_path

if TYPE_CHECKING:
    from ossyncd.scheduler import Scheduler

log = structlog.get_logger(__name__)
_KEY = _PATH = itemgetter(0)
_ROW_FILE = itemgetter(0, 2, 3, 4, 5)     # KnownRow: path, size, mtime_ns, inode, ctime_ns
_ENTRY_FILE = itemgetter(0, 4, 5, 6, 7)   # Entry: the same fields
_ROW_STATE = itemgetter(1)
_ENTRY_KIND = itemgetter(2)


def _same(k: KnownRow, e: Entry) -> bool:
    """k.identity == e.identity, without building an Identity per file of the tree."""
    return k.size == e.size and k.mtime_ns == e.mtime_ns and k.inode == e.inode and k.ctime_ns == e.ctime_ns


def _unchanged(page: list[KnownRow], ents: list[Entry]) -> bool:
    """True when the page's rows and these entries are the same files, every row `done` and
    every entry a file with the row's identity: what the per-row merge would pass over one
    by one, decided in C (a page of a tree that was not touched). A subdir marker, another
    state or kind, or any difference: False, and the page takes the per-row merge."""
    return (len(page) == len(ents) and list(map(_ROW_STATE, page)).count("done") == len(page)
            and list(map(_ENTRY_KIND, ents)).count("file") == len(ents)
            and list(map(_ROW_FILE, page)) == list(map(_ENTRY_FILE, ents)))


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:   # a name os.fsdecode kept as surrogates
        return False


def stamp(entry: Entry) -> tuple[int, int | None]:
    """What the settle tracker compares besides the size: the ctime too, so a chmod or a
    `cp -p` that restores the mtime is a change it does not swallow."""
    return (entry.mtime_ns, entry.ctime_ns)


class Rescan:
    """New or changed files settle, rows whose file vanished go, identical `done` files cost
    nothing. `rows_held` and `entries_held` are the most of each held at once."""

    def __init__(self, sched: Scheduler, root: str):
        self.sched = sched
        self.root = root
        self.now = 0.0
        self.files = 0
        self.rows_held = 0
        self.entries_held = 0
        self.t0 = time.monotonic()
        self._pending: dict[str, KnownRow] = {}   # rows named like a folder the walk enters later
        self._steps = self._run()

    def step(self, now: float, deadline: float) -> bool:
        """Merge folders until `deadline` (monotonic; at least one folder). True when done."""
        self.now = now
        for _ in self._steps:
            if time.monotonic() >= deadline:
                return False
        return True

    def run(self, now: float) -> None:
        """The whole rescan at once."""
        self.now = now
        for _ in self._steps:
            pass

    # -- the merge -------------------------------------------------------------------------

    def _run(self) -> Iterator[None]:
        s = self.sched
        for group in scan_dirs(s.watches[self.root], self.root, with_temp=True):
            if group.path == self.root and group.self_entry is not None:
                # an unreadable root: say so, and decide nothing about the rows under it
                row = s.state.get(printable_path(self.root))
                known = None
                if row is not None:
                    i = row.identity
                    known = KnownRow(row.path, row.state, i.size, i.mtime_ns, i.inode, i.ctime_ns)
                self.files += 1
                self._entry(group.self_entry, known)
                return
            self._merge(group)
            crashpoint.hit("in_rescan")
            yield   # one folder's scandir and merge run together: no row is added in between
        log.info("rescan", root=self.root, files=self.files, seconds=round(time.monotonic() - self.t0, 3),
                 rows_held=self.rows_held, entries_held=self.entries_held)

    def _merge(self, group: DirGroup) -> None:
        state = self.sched.state
        stored_dir = printable_path(group.path)
        mine = self._pending.pop(stored_dir, None)   # the row named like this folder, if any
        if group.self_entry is not None:
            self.files += 1
            self._entry(group.self_entry, mine)
        elif mine is not None:
            self._unseen(mine)
        ents = group.entries
        paths = list(map(_PATH, ents))
        plain = _utf8("\n".join(paths))   # every path stored as it is: a page can be compared whole
        if plain:
            ents.sort(key=_PATH)
            keys = list(map(_PATH, ents))
        else:   # stored the way State stores them (printable_path)
            pairs = sorted(zip(map(printable_path, paths), ents), key=_KEY)
            keys, ents = [k for k, _ in pairs], [e for _, e in pairs]
        self.entries_held = max(self.entries_held, len(ents))
        self.files += len(ents)
        keep = self.sched.watches[self.root].after_upload == "keep"
        subdirs = {printable_path(n) for n in group.subdirs}
        skip = len(stored_dir.rstrip("/")) + 1
        i = 0
        for page in state.child_rows(self.root, stored_dir):
            self.rows_held = max(self.rows_held, len(page))
            j = i + len(page)
            if keep and plain and _unchanged(page, ents[i:j]):
                i = j   # every row of the page is a `done` file as it was: nothing to decide
                continue
            for row in page:
                if row.subdir:
                    if row.path[skip:] not in subdirs:   # nothing walks it: every row under it is unseen
                        for rows in state.rows_under(self.root, row.path):
                            self.rows_held = max(self.rows_held, len(rows))
                            for r in rows:
                                self._unseen(r)
                    continue
                while i < len(keys) and keys[i] < row.path:
                    self._entry(ents[i], None)
                    i += 1
                if i < len(keys) and keys[i] == row.path:
                    e = ents[i]
                    i += 1
                    # the common case, decided as _entry would, inline: a `done` file as it was
                    # (the slices are _same's fields: test_rescan_stream holds them in line)
                    if not (keep and row.state == "done" and e.kind == "file" and row[2:6] == e[4:8]):
                        self._entry(e, row)
                elif row.path[skip:] in subdirs:
                    self._pending[row.path] = row   # decided when that folder's group comes
                else:
                    self._unseen(row)
        for e in ents[i:]:
            self._entry(e, None)

    def _entry(self, e: Entry, k: KnownRow | None) -> None:
        """One thing on disk, with its row (None when state has none)."""
        s = self.sched
        tracker = s.trackers[self.root]
        if e.kind == "temp":
            if k is not None and k.state == "skipped":
                s.temp_skipped[e.path] = self.root
            else:
                tracker.observe(e.path, e.size, stamp(e), self.now, WRITTEN)
            return
        if e.kind == "skipped":
            if not (k is not None and k.state == "skipped"):
                s.state.mark_skipped(e.path, self.root, e.reason)
                log.warning("skipped", path=e.path, reason=e.reason)
            return
        if k is not None and _same(k, e) and k.state not in ("gone", "skipped"):
            if k.state in ("settling", "waiting"):   # waiting: its marker may have come meanwhile
                tracker.observe(e.path, e.size, stamp(e), self.now, WRITTEN)
            elif k.state == "done" and s.watches[self.root].after_upload != "keep":
                self._finish_after_upload(e.path)
            return
        tracker.observe(e.path, e.size, stamp(e), self.now, WRITTEN)

    def _finish_after_upload(self, path: str) -> None:
        """A `done` source still in a delete or move watch: a kill fell between the commit of
        `done` and the action (docs/architecture.md §4, durability order 3); do it now."""
        row = self.sched.state.get(path)
        if row is not None and not any(j.row.path == path for j in self.sched.jobs.values()):
            self.sched._after_upload(row)

    def _unseen(self, k: KnownRow) -> None:
        """A row whose file the walk did not find."""
        s = self.sched
        if k.state in ("done", "gone") or any(j.row.path == k.path for j in s.jobs.values()):
            return
        s.trackers[self.root].forget(k.path)
        s._gone(k.path, "vanished before it was uploaded")
