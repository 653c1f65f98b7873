"""``RotatingCredentials``: the current snapshot of one Source, refreshed ahead of expiry."""

from __future__ import annotations

import math
import random
import threading
import time
from typing import Callable

import structlog

from ossyncd.errors import CredentialsError

from .base import Snapshot, Source, iso8601, mask_key_id

log = structlog.get_logger("ossyncd.credentials")


class RotatingCredentials:
    """The current credentials, refreshed ahead of expiry.

    * ``current()`` is lock-free while the cached snapshot is usable; otherwise it
      refreshes synchronously (single flight).  While a failed refresh is in its
      backoff window it raises the last error at once instead of hammering the source.
    * ``tick(now)`` refreshes when due: at ``refresh_fraction`` of the lifetime
      (measured from the start of the fetch), or at the retry time after a failure.
      A failed refresh keeps the old snapshot until it expires.  Backoff after the
      n-th consecutive failure is ``min(max_backoff, min_backoff * 2**(n-1))`` scaled by
      a jitter factor in [0.5, 1.0]; permanent errors back off at the cap straight away (and
      keep being retried there: an operator's fix at the source is picked up by itself); an
      error carrying ``retry_after`` waits at least that long.
    * ``unavailable()``: the last fetch failed and nothing usable is held, so the scheduler
      holds its queue (rows wait in ``retry_wait``) instead of starting uploads that would fail
      at once.
    * ``force_refresh(stale)``: OSS rejected ``stale``.  If the current snapshot is
      already a different, usable one it is returned with no fetch, so many parts
      failing together cause one refresh.
    """

    def __init__(self, source: Source, *, clock: Callable[[], float] = time.time,
                 refresh_fraction: float = 0.8, min_backoff: float = 1.0, max_backoff: float = 60.0,
                 rng: Callable[[], float] = random.random, on_change: Callable[[], None] | None = None):
        if not 0.0 < refresh_fraction <= 1.0:
            raise ValueError("refresh_fraction must be in (0, 1]")
        self._source = source
        self._clock = clock
        self._fraction = float(refresh_fraction)
        self._min_backoff = float(min_backoff)
        self._max_backoff = max(float(max_backoff), float(min_backoff))
        self._rng = rng
        self._cond = threading.Condition(threading.Lock())
        self._snap: Snapshot | None = None
        self._rejected: Snapshot | None = None   # the snapshot OSS refused (force_refresh)
        self._last_refresh_at: float | None = None
        self._next_attempt: float = -math.inf     # due immediately: no snapshot yet
        self._failures = 0
        self._last_error: CredentialsError | None = None
        self._last_attempt_failed = False
        self._seq = 0                              # completed attempts
        self._refreshing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # called after every fetch, so a published status() is never older than the credentials
        # in use (the daemon writes it to the state DB for `ossyncd status`)
        self.on_change = on_change

    def replace_source(self, source: Source, *, min_backoff: float, max_backoff: float) -> None:
        """A reloaded [credentials] section: the next request fetches from `source` (a fixed
        secret, a new role), while uploads in flight carry on. Every holder of this object
        (the OSS client, the retry decorator) sees the new credentials without being touched."""
        with self._cond:
            while self._refreshing:              # never let an old-source fetch land afterwards
                self._cond.wait(0.1)
            self._source = source
            self._min_backoff = float(min_backoff)
            self._max_backoff = max(float(max_backoff), float(min_backoff))
            self._snap = self._rejected = self._last_error = None
            self._next_attempt = -math.inf
            self._failures = 0
            self._last_attempt_failed = False

    @property
    def source(self) -> Source:
        """The source in use (replace_source swaps it)."""
        return self._source

    def __repr__(self) -> str:
        return f"<RotatingCredentials source={self._source.name!r} current={self._snap!r}>"

    # -- state helpers (call with the lock held, or accept a racy read) -----------------

    def _usable(self, snap: Snapshot | None, now: float) -> bool:
        return snap is not None and not snap.expired(now) and not (
            self._rejected is not None and snap == self._rejected)

    def _backoff(self, err: CredentialsError) -> float:
        if not err.transient:
            base = self._max_backoff
        else:
            base = min(self._max_backoff, self._min_backoff * 2 ** min(self._failures - 1, 62))
        wait = base * (0.5 + 0.5 * self._rng())
        # a server that said when to come back (Retry-After) is not asked sooner
        return max(wait, err.retry_after) if err.retry_after else wait

    def _raise_last(self):
        err = self._last_error
        if err is None:  # pragma: no cover - defensive
            raise CredentialsError(f"{self._source.name} credentials are not available", transient=True,
                                   source=self._source.name)
        raise err.copy()

    # -- the one place that fetches ------------------------------------------------------

    def _attempt(self, started: float) -> tuple[Snapshot | None, CredentialsError | None]:
        """Fetch once (caller has set ``_refreshing``), record the outcome, wake waiters."""
        name = self._source.name
        snap: Snapshot | None = None
        err: CredentialsError | None = None
        try:
            snap = self._source.fetch()
            if not isinstance(snap, Snapshot):
                raise CredentialsError(f"{name} source returned {type(snap).__name__}, not a Snapshot",
                                       transient=True, source=name)
            end = self._clock()
            if snap.expires_at is not None and snap.expires_at <= end:
                raise CredentialsError(
                    f"{name} returned credentials that expired at {iso8601(snap.expires_at)}, before the "
                    f"local time {iso8601(end)}; check the system clock (NTP)", transient=True, source=name,
                    code="ExpiredOnArrival")
        except CredentialsError as e:
            err, snap = e, None
        except Exception as e:  # a bug or an SDK surprise: never leak its text, keep the daemon alive
            err, snap = CredentialsError(f"{name} credentials fetch failed unexpectedly: "
                                         f"{type(e).__name__}", transient=True, source=name), None
        with self._cond:
            self._seq += 1
            self._refreshing = False
            now = self._clock()
            if snap is not None:
                self._snap = snap
                self._rejected = None
                self._last_refresh_at = now
                self._failures = 0
                self._last_error = None
                self._last_attempt_failed = False
                if snap.expires_at is None:
                    self._next_attempt = math.inf
                else:
                    self._next_attempt = started + self._fraction * (snap.expires_at - started)
            else:
                assert err is not None   # one of the two is set
                self._failures += 1
                self._last_error = err
                self._last_attempt_failed = True
                self._next_attempt = max(now, started) + self._backoff(err)
            failures, next_attempt, current = self._failures, self._next_attempt, self._snap
            self._cond.notify_all()
        if snap is not None:
            log.info("credentials.refreshed", source=name, access_key_id=mask_key_id(snap.access_key_id),
                     expires_at=iso8601(snap.expires_at), next_refresh_at=iso8601(next_attempt))
        elif err is not None:
            still_valid = current is not None and not current.expired(now)
            (log.warning if still_valid and err.transient else log.error)(
                "credentials.refresh_failed", source=name, error=str(err), transient=err.transient,
                consecutive_failures=failures, retry_at=iso8601(next_attempt),
                current_valid_until=iso8601(current.expires_at) if current is not None and still_valid else None)
        self._announce()
        return snap, err

    def _announce(self) -> None:
        callback = self.on_change
        if callback is None:
            return
        try:
            callback()
        except Exception as e:  # e.g. the state DB is busy: the next publish catches up
            log.error("credentials.status_not_published", source=self._source.name, error=repr(e))

    def _single_flight(self, satisfied: Callable[[Snapshot | None, float, int], bool]) -> Snapshot:
        with self._cond:
            seq0 = self._seq
            while True:
                now = self._clock()
                current = self._snap
                if current is not None and satisfied(current, now, seq0):
                    return current
                if self._refreshing:
                    self._cond.wait(timeout=1.0)
                    continue
                if self._seq > seq0 and self._last_attempt_failed:
                    self._raise_last()          # the refresh we waited for failed: share its error
                if self._failures and now < self._next_attempt:
                    self._raise_last()          # in backoff
                self._refreshing = True
                break
        snap, err = self._attempt(now)
        if snap is None:
            assert err is not None
            raise err.copy()
        return snap

    # -- public API ------------------------------------------------------------------------

    def current(self) -> Snapshot:
        snap = self._snap
        if snap is not None and self._usable(snap, self._clock()):
            return snap
        return self._single_flight(lambda s, now, seq0: self._usable(s, now))

    def force_refresh(self, stale: Snapshot | None = None) -> Snapshot:
        with self._cond:
            if stale is not None and self._snap is not None and self._snap == stale:
                if self._rejected != stale:
                    log.info("credentials.rejected_by_server", source=self._source.name,
                             access_key_id=mask_key_id(stale.access_key_id))
                self._rejected = stale

        def satisfied(s, now, seq0):
            if stale is not None:
                return self._usable(s, now) and s != stale
            return self._seq > seq0 and not self._last_attempt_failed and self._usable(s, now)

        return self._single_flight(satisfied)

    def tick(self, now: float) -> float:
        with self._cond:
            if self._refreshing:
                return now + 0.05
            if now < self._next_attempt:
                return self._next_attempt
            self._refreshing = True
        self._attempt(now)
        with self._cond:
            return self._next_attempt

    def describe(self) -> str:
        """Where the credentials come from, for check-config and status (never a secret)."""
        describe = getattr(self._source, "describe", None)
        return (describe() if callable(describe) else None) or self._source.name

    def retry_at(self) -> float | None:
        """After a failed fetch, when the next one is due (epoch seconds); None when healthy.
        Work waiting for credentials should come back then, not sooner (it would fail at once)."""
        with self._cond:
            if self._failures and math.isfinite(self._next_attempt):
                return self._next_attempt
            return None

    def unavailable(self) -> CredentialsError | None:
        """The last fetch's error while it failed and no usable snapshot is held (a request now
        would fail at once), else None. The background thread keeps retrying; ``on_change``
        fires when a fetch succeeds."""
        with self._cond:
            if self._last_attempt_failed and not self._usable(self._snap, self._clock()):
                return self._last_error
            return None

    def status(self) -> dict:
        with self._cond:
            now = self._clock()
            snap = self._snap
            return {
                "source": self._source.name,
                "link": self.describe(),
                "expires_at": iso8601(snap.expires_at) if snap else None,
                "last_refresh_at": iso8601(self._last_refresh_at),
                "last_error": str(self._last_error) if self._last_error else None,
                "next_attempt_at": iso8601(self._next_attempt if self._next_attempt > -math.inf else now),
                "healthy": self._usable(snap, now),
                "consecutive_failures": self._failures,
            }

    # -- thread loop -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"ossyncd-credentials-{self._source.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                nxt = self.tick(self._clock())
            except Exception as e:  # pragma: no cover - tick records fetch errors itself
                log.error("credentials.tick_crashed", source=self._source.name, error=type(e).__name__)
                nxt = self._clock() + self._min_backoff
            # cap the sleep so a suspended host or a stepped clock is noticed soon
            delay = min(max(nxt - self._clock(), 0.01), 30.0)
            self._stop.wait(delay)
