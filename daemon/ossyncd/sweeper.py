"""The orphan sweep: abort multipart uploads under the watch prefixes that state does not own.

Orphans come from crashes between InitiateMultipartUpload and its record, from a state DB
that was moved aside, or from other tools. Their parts cost storage until aborted. The
sweep runs at startup and every `daemon.orphan_sweep_interval` on its own thread (it makes
network calls, which must not stall the scheduler loop; State and the store are
thread-safe). `tick(now)` is one step, so tests can drive it with an injected clock.

An upload is aborted only if all of these hold:
- it is under a watch prefix (ListMultipartUploads by prefix);
- its id is not in state's `uploads` table (`state.owned_upload_ids()`);
- no file with its key is `uploading` right now;
- it was initiated at least `daemon.orphan_max_age` seconds ago.

Why the third rule: the uploader records an upload id right after InitiateMultipartUpload
returns, but between the two the id exists only on the server. The file is `uploading`
from before Initiate until after the record, so reading the uploading keys *before* the
owned ids closes that window whatever `orphan_max_age` is (0 included): an upload listed
earlier but recorded after the owned-ids read must belong to a file that was uploading
at the keys read. (Aborting an id state just dropped is harmless: it was completed or
already aborted, and abort is idempotent.) The age rule is for uploads of other processes
sharing the prefix, which state cannot know about.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import structlog

from ossyncd.config import Config
from ossyncd.errors import OssyncdError
from ossyncd.model import OpenUpload

log = structlog.get_logger(__name__)
RETRY_AFTER_FAILURE = 300.0   # seconds; capped by the sweep interval
IDLE_WAIT = 5.0               # how often the thread looks at pause/reload while waiting


class Sweeper:
    def __init__(self, store, state, cfg: Config, *, on_abort: Callable[[OpenUpload], None] | None = None):
        self.store = store
        self.state = state
        self.cfg = cfg            # replaced on reload (a single attribute swap)
        self.on_abort = on_abort
        self.next_at = 0.0        # run at startup

    def prefixes(self) -> list[str]:
        """The watch prefixes, with prefixes covered by a shorter one dropped."""
        out: list[str] = []
        for p in sorted({w.prefix for w in self.cfg.watch}):
            if not any(p.startswith(q) for q in out):
                out.append(p)
        return out

    def tick(self, now: float, cancel: threading.Event | None = None) -> list[OpenUpload] | None:
        """Sweep if due; returns the aborted uploads, or None if nothing was due."""
        if now < self.next_at:
            return None
        interval = self.cfg.daemon.orphan_sweep_interval
        if self.state.get_meta("paused") == "1":
            self.next_at = now + IDLE_WAIT   # paused means no writes to OSS; sweep after resume
            return None
        try:
            aborted = self.sweep(now, cancel)
        except OssyncdError as e:
            if cancel is not None and cancel.is_set():
                return []
            self.next_at = now + min(interval, RETRY_AFTER_FAILURE)
            log.warning("orphan sweep failed; will try again", error=str(e), retry_in=self.next_at - now)
            return []
        self.next_at = now + interval
        return aborted

    def sweep(self, now: float, cancel: threading.Event | None = None) -> list[OpenUpload]:
        max_age = self.cfg.daemon.orphan_max_age
        listed: dict[str, OpenUpload] = {}
        for prefix in self.prefixes():
            for u in self.store.list_uploads(prefix, cancel=cancel):
                listed[u.upload_id] = u
        if not listed:
            return []
        # The order of these two reads matters; see the module docstring.
        busy_keys = {f.key for f in self.state.files("uploading")}
        owned = self.state.owned_upload_ids()
        aborted: list[OpenUpload] = []
        for u in listed.values():
            if u.upload_id in owned or u.key in busy_keys:
                continue
            age = now - u.initiated
            if age < max_age:
                continue
            self.store.abort(u.key, u.upload_id, cancel=cancel)
            log.info("orphan upload aborted", key=u.key, upload_id=u.upload_id, age_seconds=round(age))
            aborted.append(u)
            if self.on_abort is not None:
                self.on_abort(u)
        log.info("orphan sweep", listed=len(listed), aborted=len(aborted))
        return aborted

    def run(self, stop: threading.Event) -> None:
        """The thin loop around tick(); exits when `stop` is set."""
        while not stop.is_set():
            try:
                self.tick(time.time(), cancel=stop)
            except Exception as e:  # never let the sweep take the daemon down
                if stop.is_set():
                    return
                log.error("orphan sweep crashed", error=repr(e))
                self.next_at = time.time() + min(self.cfg.daemon.orphan_sweep_interval, RETRY_AFTER_FAILURE)
            stop.wait(max(0.1, min(IDLE_WAIT, self.next_at - time.time())))
