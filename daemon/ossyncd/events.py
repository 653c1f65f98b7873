"""Delivery of the outbox (docs/architecture.md §8): [[hook]] commands and webhooks.

The state DB writes an event row per interested hook in the transaction of the file's state
change (`state.State._emit`, routed by `route`). Here one thread picks due rows and runs
them on a pool of `events.concurrency` threads of its own, so a slow or hanging hook holds
only a delivery slot, never an upload. At least once: a row is `delivered` only after the
hook succeeded, so a crash mid-delivery sends it again; receivers de-duplicate on `id`.
A failure is retried with exponential backoff until `max_age` after the event, then `dead`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import structlog

from ossyncd.config import Config, HookConfig
from ossyncd.errors import StateError
from ossyncd.state import EventRow, State

log = structlog.get_logger(__name__)
POLL_EVERY = 0.2          # seconds between looks at the outbox
PRUNE_EVERY = 60.0
SIGNATURE_HEADER = "X-Ossyncd-Signature"
ENV_FIELDS = ("id", "kind", "path", "key", "url", "size", "crc64", "etag", "state", "error", "watch", "attempts",
              "callback")


def route(cfg: Config) -> Callable[[str, str, str], list[str]]:
    """The state DB's router: (kind, watch root, path) -> names of the hooks that want it."""
    hooks = cfg.hook

    def wanted(kind: str, watch: str, path: str) -> list[str]:
        out = []
        for h in hooks:
            if kind not in h.on or (h.watch is not None and str(h.watch) != watch):
                continue
            if h.match and not fnmatch.fnmatch(os.path.relpath(path, watch) if watch else path, h.match):
                continue
            out.append(h.name)
        return out
    return wanted


def signature(secret: str, body: bytes) -> str:
    """`sha256=<hex HMAC-SHA256 of the body>`, as in the README's receiver example."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(hook: HookConfig, payload: str, children: set | None = None) -> None:
    """One attempt. Raises DeliveryFailed with the reason. A command runs in `children` while
    it runs, so that a stop can kill it."""
    if hook.url:
        body = payload.encode()
        headers = {"Content-Type": "application/json", "User-Agent": "ossyncd"}
        if hook.secret:
            headers[SIGNATURE_HEADER] = signature(hook.secret, body)
        req = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=hook.timeout) as resp:
                resp.read(65536)
        except urllib.error.HTTPError as e:
            raise DeliveryFailed(f"HTTP {e.code} from {hook.url}") from None
        except (OSError, ValueError) as e:   # refused, reset, timeout, bad answer
            raise DeliveryFailed(f"{hook.url}: {getattr(e, 'reason', None) or e}") from None
        return
    event = json.loads(payload)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSSYNCD_")}
    env.update({f"OSSYNCD_{f.upper()}": "" if event.get(f) is None else str(event[f]) for f in ENV_FIELDS})
    env["OSSYNCD_EVENT"] = payload
    try:
        proc = subprocess.Popen(list(hook.command), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, close_fds=True, start_new_session=True)
    except OSError as e:
        raise DeliveryFailed(f"{hook.command[0]}: {e.strerror}") from None
    if children is not None:
        children.add(proc)
    try:
        _, err = proc.communicate(timeout=hook.timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise DeliveryFailed(f"{hook.command[0]}: killed after the {hook.timeout:g} s timeout") from None
    finally:
        if children is not None:
            children.discard(proc)
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip()[-300:]
        raise DeliveryFailed(f"{hook.command[0]} exited {proc.returncode}" + (f": {tail}" if tail else ""))


def _kill(proc: subprocess.Popen) -> None:
    """The hook's whole process group (its own session): a shell script's children too."""
    try:
        os.killpg(proc.pid, 9)
    except OSError:
        pass
    proc.communicate()


class DeliveryFailed(Exception):
    pass


class Deliverer:
    """The delivery thread and its pool. `run(stop)` is the thread's body; `on_result(hook,
    ok)` feeds the metrics."""

    def __init__(self, state: State, cfg: Config, *, on_result: Callable[[str, bool], None] | None = None):
        self.state = state
        self.cfg = cfg
        self.on_result = on_result
        self.pool = ThreadPoolExecutor(cfg.events.concurrency, thread_name_prefix="hook")
        self.slots = threading.Semaphore(cfg.events.concurrency)
        self.in_flight: set[int] = set()
        self.children: set = set()        # hook commands running now
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self._pruned = float("-inf")
        self.error: str | None = None     # the state DB problem the loop is waiting out

    def use_config(self, cfg: Config) -> None:
        """A reload: hooks and their settings from the next delivery on (the pool size stays)."""
        self.cfg = cfg
        self.state.router = route(cfg)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick(time.time())
                self.error = None
            except StateError as e:    # the scheduler decides about the DB; deliveries wait
                if str(e) != self.error:
                    log.warning("event delivery waits for the state DB", error=str(e))
                self.error = str(e)
            except Exception as e:   # a bug: logged, and delivery carries on
                log.exception("event delivery loop crashed; retrying", error=repr(e))
            self.wake.wait(POLL_EVERY)
            self.wake.clear()

    def tick(self, now: float) -> None:
        if now - self._pruned >= PRUNE_EVERY:
            self._pruned = now
            self.state.prune_events(now - self.cfg.events.keep_delivered)
        with self._lock:
            busy = list(self.in_flight)
        free = self.cfg.events.concurrency - len(busy)
        if free <= 0:
            return
        hooks = {h.name: h for h in self.cfg.hook}
        for row in self.state.due_events(now, exclude=busy, limit=free):
            hook = hooks.get(row.hook)
            if hook is None:
                self.state.event_failed(row.id, f"hook {row.hook!r} is no longer in the config; add it back "
                                                f"and run `ossyncd events retry`", next_attempt_at=None)
                continue
            if not self.slots.acquire(blocking=False):
                return
            with self._lock:
                self.in_flight.add(row.id)
            self.pool.submit(self._one, hook, row)

    def _one(self, hook: HookConfig, row: EventRow) -> None:
        try:
            try:
                deliver(hook, row.payload, self.children)
            except DeliveryFailed as e:
                self._failed(hook, row, str(e))
            else:
                self.state.event_delivered(row.id)
                log.info("event delivered", hook=hook.name, kind=row.kind, id=row.event_id, path=row.path)
                if self.on_result is not None:
                    self.on_result(hook.name, True)
        except StateError as e:   # stays pending: delivered again later (at least once)
            log.warning("event delivery not recorded", hook=hook.name, id=row.event_id, error=str(e))
        except Exception as e:
            log.exception("event delivery crashed", hook=hook.name, id=row.event_id, error=repr(e))
        finally:
            with self._lock:
                self.in_flight.discard(row.id)
            self.slots.release()
            self.wake.set()

    def _failed(self, hook: HookConfig, row: EventRow, reason: str) -> None:
        now = time.time()
        delay = min(hook.retry_backoff_max, hook.retry_backoff * 2 ** min(row.attempts, 30))
        at: float | None = now + delay
        if now + delay - row.created_at > hook.max_age:
            at = None
        self.state.event_failed(row.id, reason, next_attempt_at=at)
        if at is None:
            log.error("event dead: max_age reached", hook=hook.name, kind=row.kind, id=row.event_id,
                      path=row.path, error=reason, attempts=row.attempts + 1,
                      hint="fix the hook, then `ossyncd events retry`")
        else:
            log.warning("event delivery failed; retrying", hook=hook.name, id=row.event_id, error=reason,
                        attempts=row.attempts + 1, retry_in=round(delay, 2))
        if self.on_result is not None:
            self.on_result(hook.name, False)

    def shutdown(self) -> None:
        """Deliveries still running are abandoned: their rows stay pending and go again, and
        their commands are killed (nothing is left running after the daemon)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(self.children):
            try:
                os.killpg(proc.pid, 9)
            except OSError:
                pass
