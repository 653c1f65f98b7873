"""Filesystem events -> candidate paths. The only module that imports watchdog.

One observer per ``[[watch]]`` root, so a root can fall back to polling (or be
removed) on its own. ``on_event(watch, path, how)`` (how: ``settle.WRITTEN``, ``CLOSED`` or
``RENAMED``) is called from observer threads and must be thread-safe (e.g. put into a queue). The scanner's
periodic rescan remains the safety net for anything an event source misses.
"""

from __future__ import annotations

import errno
import os
import threading
import warnings
from typing import Callable, Iterable

import structlog
from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyFullEmitter, InotifyObserver
from watchdog.observers.inotify_c import InotifyFD
from watchdog.observers.polling import PollingObserverVFS

from .paths import is_excluded, is_temp_name, relpath_of, watch_ignores
from .scanner import scan_tree
from .settle import CLOSED, RENAMED, WRITTEN

log = structlog.get_logger("ossyncd.watcher")

# watchdog warns when a new subfolder's watch is registered twice (a race it
# resolves itself); harmless, and noisy under rsync.
warnings.filterwarnings("ignore", message="Callback with id .* already exists", category=RuntimeWarning)

OnEvent = Callable[[object, str, int], None]   # (watch, path, settle.WRITTEN / CLOSED / RENAMED)
OnRescan = Callable[[object, str], None]

# Only what we map; fewer inotify event kinds also means fewer queue overflows
# (the uploader's own reads would otherwise raise IN_OPEN/IN_CLOSE_NOWRITE).
_EVENT_FILTER = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, DirMovedEvent, DirDeletedEvent]

_LIMIT_HINTS = {
    errno.ENOSPC: (
        "fs.inotify.max_user_watches",
        "sysctl fs.inotify.max_user_watches=524288 (persist it with the sysctl drop-in shipped in systemd/)",
    ),
    errno.EMFILE: (
        "fs.inotify.max_user_instances",
        "sysctl fs.inotify.max_user_instances=1024 (persist it with the sysctl drop-in shipped in systemd/);"
        " also check the open-files limit (LimitNOFILE)",
    ),
}


class _InotifyFD(InotifyFD):
    """Reports what watchdog swallows: a watch on a subfolder that fails for
    lack of watches (it only raises for the root) and queue overflows."""

    def __init__(self, on_limit: Callable[[OSError], None], on_overflow: Callable[[], None]):
        self._on_limit = on_limit
        self._on_overflow = on_overflow
        super().__init__()

    def add_callback(self, path, mask, callback, id_):
        try:
            return super().add_callback(path, mask, callback, id_)
        except OSError as e:
            if e.errno in _LIMIT_HINTS:
                self._on_limit(e)
            raise

    def handle_event(self, event):
        if event.is_queue_overflow:
            self._on_overflow()
        super().handle_event(event)


class _InotifyObserver(InotifyObserver):
    def __init__(self, fd: _InotifyFD, timeout: float):
        # InotifyObserver.__init__ builds its own fd; ours reports limits.
        self._inotify_fd = fd
        fd.start()
        BaseObserver.__init__(self, InotifyFullEmitter, timeout=timeout, inotify_fd=fd)


def _new_inotify_observer(on_limit, on_overflow) -> BaseObserver:
    """The seam where inotify is set up (tests inject limit errors here)."""
    return _InotifyObserver(_InotifyFD(on_limit, on_overflow), timeout=1.0)


class _Root:
    def __init__(self, watch):
        self.watch = watch
        self.root = os.path.normpath(os.fspath(watch.path))
        # inotify on a symlink watches the link, not the folder: watch the target, and
        # report paths under the configured root, as the scanner and state name them.
        self.real = os.path.realpath(self.root)
        self.observer: BaseObserver | None = None
        self.backend: str | None = None  # "inotify" | "polling"
        self.active = False  # False: drop events (removed / stopping)
        self.limit_error: OSError | None = None
        self.switching = False

    def configured(self, path) -> str:
        """An event path below the watched target, renamed to below the configured root."""
        path = os.fsdecode(path)
        if self.real == self.root:
            return path
        if path == self.real:
            return self.root
        head = self.real.rstrip("/") + "/"
        return self.root + "/" + path[len(head):] if path.startswith(head) else path


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher, root: _Root):
        self.w = watcher
        self.r = root

    def dispatch(self, event) -> None:
        if not self.r.active:
            return
        try:
            self._dispatch(event)
        except Exception:  # a bad callback must not kill the observer thread
            log.exception("watch_event_failed", watch=self.r.watch.index, fs_event=repr(event))

    def _dispatch(self, event) -> None:
        t = type(event)
        r = self.r
        if t is FileClosedEvent:
            self.w._report(r, r.configured(event.src_path), CLOSED)
        elif t is FileCreatedEvent or t is FileModifiedEvent:
            self.w._report(r, r.configured(event.src_path), WRITTEN)
        elif t is FileMovedEvent:
            # A rename is atomic: the file is complete under its final name.
            if event.dest_path:
                self.w._report(r, r.configured(event.dest_path), RENAMED)
        elif t is DirMovedEvent:
            if event.dest_path and r.watch.recursive:
                self.w._walk(r, r.configured(event.dest_path), RENAMED)
        elif t is DirDeletedEvent and r.configured(event.src_path) == r.root:
            log.error("watch_root_deleted", watch=self.r.watch.index, path=self.r.root,
                      hint="recreate the folder; the watch is re-armed when it reappears")


class Watcher:
    def __init__(
        self,
        on_event: OnEvent,
        *,
        force_polling_for: Iterable[int | str | os.PathLike] = (),
        poll_interval: float = 2.0,
        on_rescan: OnRescan | None = None,
    ):
        """``force_polling_for``: watch indexes or root paths that use polling
        (tests; network filesystems). ``OSSYNCD_FORCE_POLLING=1`` forces all.
        ``on_rescan(watch, reason)`` is called when events may have been lost
        (queue overflow, fallback switch); without it the root is walked and
        every file reported as WRITTEN."""
        self._on_event = on_event
        self._on_rescan = on_rescan
        self._force = {f if isinstance(f, int) else os.path.normpath(os.fspath(f)) for f in force_polling_for}
        self._force_all = os.environ.get("OSSYNCD_FORCE_POLLING", "") not in ("", "0")
        self._poll_interval = poll_interval
        self._roots: dict[int, _Root] = {}
        self._lock = threading.RLock()
        self._started = False

    # -- public API --------------------------------------------------------

    def add(self, watch) -> None:
        with self._lock:
            if watch.index in self._roots:
                self.remove(self._roots[watch.index].watch)
            r = self._roots[watch.index] = _Root(watch)
            if self._started:
                self._start_root(r)

    def remove(self, watch) -> None:
        with self._lock:
            r = self._roots.pop(watch.index, None)
        if r is not None:
            self._stop_root(r)

    def start(self) -> None:
        with self._lock:
            self._started = True
            for r in list(self._roots.values()):
                if r.observer is None:
                    self._start_root(r)

    def stop(self) -> None:
        with self._lock:
            self._started = False
            roots = list(self._roots.values())
        for r in roots:
            self._stop_root(r)

    def alive(self, watch) -> bool:
        """False when a started root's event source died (its observer or emitter thread
        ended): the scheduler then re-arms it, since no event would come from it again."""
        with self._lock:
            r = self._roots.get(watch.index)
            if r is None or not self._started or not r.active or r.switching:
                return True
            obs = r.observer
        return obs is not None and obs.is_alive() and all(e.is_alive() for e in list(obs.emitters))

    def backend(self, watch) -> str | None:
        """"inotify" or "polling" for a started root (for status and tests)."""
        r = self._roots.get(watch.index)
        return r.backend if r is not None else None

    def source(self, watch) -> dict:
        """How a started root's events arrive, for `status`: {"events": "inotify" | "polling"},
        with "why" when polling stands in for an inotify limit (the sysctl to raise)."""
        r = self._roots.get(watch.index)
        if r is None or r.backend is None:
            return {}
        out = {"events": r.backend}
        e = r.limit_error
        if r.backend == "polling" and e is not None and e.errno in _LIMIT_HINTS:
            out["why"] = f"{e.strerror or e}; raise {_LIMIT_HINTS[e.errno][0]}"
        return out

    # -- observers ---------------------------------------------------------

    def _forced(self, r: _Root) -> bool:
        return self._force_all or r.watch.index in self._force or r.root in self._force

    def _start_root(self, r: _Root) -> None:
        r.active, r.limit_error, r.switching = True, None, False
        if not self._forced(r):
            obs = None
            try:
                obs = _new_inotify_observer(
                    lambda e: self._limit_hit(r, e), lambda: self._lost_events(r, "inotify queue overflow")
                )
                self._schedule(obs, r)
                obs.start()
                r.observer, r.backend = obs, "inotify"
            except OSError as e:
                if obs is not None:
                    obs.stop()
                if e.errno not in _LIMIT_HINTS:
                    r.active = False
                    log.error("watch_failed", watch=r.watch.index, path=r.root, error=str(e))
                    raise
                r.limit_error = e
            if r.limit_error is None:
                return
            # Root or a subfolder could not be watched: polling sees all of it.
            self._log_limit(r, r.limit_error)
            if r.observer is not None:
                self._stop_observer(r.observer)
                r.observer = None
        self._start_polling(r)

    def _start_polling(self, r: _Root) -> None:
        # lstat: never follow symlinks (a link loop would hang the snapshot).
        obs = PollingObserverVFS(os.lstat, os.scandir, polling_interval=self._poll_interval)
        self._schedule(obs, r)
        obs.start()
        r.observer, r.backend = obs, "polling"
        log.info("watch_polling", watch=r.watch.index, path=r.root, interval=self._poll_interval)

    def _schedule(self, obs: BaseObserver, r: _Root) -> None:
        r.real = os.path.realpath(r.root)   # again: a re-armed root may point elsewhere now
        obs.schedule(_Handler(self, r), r.real, recursive=bool(r.watch.recursive), event_filter=_EVENT_FILTER)

    def _stop_root(self, r: _Root) -> None:
        r.active = False
        obs, r.observer, r.backend = r.observer, None, None
        if obs is not None:
            self._stop_observer(obs)

    @staticmethod
    def _stop_observer(obs: BaseObserver) -> None:
        obs.stop()
        if obs.is_alive() and obs is not threading.current_thread():
            obs.join(timeout=10)

    def _log_limit(self, r: _Root, e: OSError) -> None:
        sysctl, fix = _LIMIT_HINTS[e.errno]  # type: ignore[index]  # callers pass only errors listed there
        log.error(
            "inotify_limit_reached",
            watch=r.watch.index,
            path=r.root,
            error=e.strerror or str(e),
            sysctl=sysctl,
            fix=fix,
            fallback=f"polling this folder every {self._poll_interval:g}s (slower, more CPU)",
        )

    def _limit_hit(self, r: _Root, e: OSError) -> None:
        # Runs on watchdog's threads. During start, _start_root reads it; later
        # (a new subfolder), switch this root to polling from another thread.
        if r.limit_error is not None:
            return
        r.limit_error = e
        if r.backend == "inotify" and not r.switching:
            r.switching = True
            threading.Thread(target=self._switch_to_polling, args=(r,), name="ossyncd-fallback", daemon=True).start()

    def _switch_to_polling(self, r: _Root) -> None:
        with self._lock:
            if not r.active or r.backend != "inotify" or self._roots.get(r.watch.index) is not r:
                return
            self._log_limit(r, r.limit_error)  # type: ignore[arg-type]  # _limit_hit set it before this thread
            old, r.observer = r.observer, None
            if old is not None:
                self._stop_observer(old)
            self._start_polling(r)
        # Files written while no event source covered them.
        self._lost_events(r, "switched to polling after the inotify limit was reached", background=False)

    def _lost_events(self, r: _Root, reason: str, background: bool = True) -> None:
        log.warning("watch_events_lost", watch=r.watch.index, path=r.root, reason=reason)
        if self._on_rescan is not None:
            self._on_rescan(r.watch, reason)
        elif background:
            threading.Thread(target=self._walk, args=(r, r.root, False), name="ossyncd-rewalk", daemon=True).start()
        else:
            self._walk(r, r.root, WRITTEN)

    # -- event mapping -----------------------------------------------------

    def _report(self, r: _Root, path, how: int) -> None:
        path = os.fsdecode(path)
        try:
            rel = relpath_of(r.root, path)
        except ValueError:
            return
        w = r.watch
        if not rel or is_temp_name(rel.rpartition("/")[2], getattr(w, "temp_names", None)):
            return
        if is_excluded(rel, w.exclude or ()) or watch_ignores(w, path):
            return
        self._on_event(w, path, how)

    def _walk(self, r: _Root, top: str, how: int) -> None:
        """Report every candidate below ``top`` (a folder moved in, or a rewalk)."""
        for entry in scan_tree(r.watch, top):
            if not r.active:
                return
            self._on_event(r.watch, entry.path, how)
