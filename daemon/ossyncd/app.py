"""`ossyncd run`: the composition root of the daemon.

Builds everything from the config, takes the single-instance lock, starts credential
rotation, the watcher and the scheduler loop, speaks sd_notify, and handles signals:
SIGTERM/SIGINT stop cleanly (checkpoints kept, exit 0), SIGHUP reloads the config.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

import structlog

from ossyncd import log as logsetup
from ossyncd.config import Config, load_config, require_watches, secret_file_warning
from ossyncd.credentials.http import Registration, path_token
from ossyncd.errors import ConfigError, OssyncdError, StateError
from ossyncd.events import Deliverer
from ossyncd.fleet import heartbeat_url, resolve_oss
from ossyncd.heartbeat import Heartbeat
from ossyncd.notify import Notifier
from ossyncd.scheduler import Scheduler
from ossyncd.signals import stop_on_signals
from ossyncd.stack import Hooks, Stack, build_source, restart_only
from ossyncd.sweeper import Sweeper
from ossyncd.watcher import Watcher

if TYPE_CHECKING:   # prometheus_client is imported only when metrics are on
    from ossyncd.metrics import Metrics

log = structlog.get_logger(__name__)
SHUTDOWN_BUDGET = 20.0   # seconds from SIGTERM to exit; the unit's TimeoutStopSec is 30


def _bounded(fn, seconds: float) -> None:
    """Run fn() but wait at most `seconds` for it (a stop that hangs must not hang the exit)."""
    t = threading.Thread(target=fn, name=f"stop-{getattr(fn, '__name__', 'step')}", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        log.warning("shutdown step did not finish in time; abandoned", step=t.name)


def _exit_if_stuck(rc: int) -> None:
    """Interpreter exit joins every pool thread (daemon or not), and one may sit in a request
    for a whole read timeout: when any thread is left, flush and leave at once."""
    left = [t.name for t in threading.enumerate() if t.is_alive() and t is not threading.main_thread()]
    if left:
        log.info("abandoning threads still running", threads=left)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _cannot_start(e: OssyncdError) -> int:
    """One log line and one stderr line (systemd's journal shows both), and the error's exit code."""
    log.error("cannot start", error=str(e))
    print(f"{e.label}: {e}", file=sys.stderr)
    return e.exit_code


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    """A thread that ends with an exception (a library's, say a watchdog emitter's) is one
    JSON error line, never a bare traceback on stderr or nothing at all."""
    if issubclass(args.exc_type, SystemExit):
        return
    log.error("thread_crashed", thread=args.thread.name if args.thread else None, error=repr(args.exc_value),
              exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


class Daemon:
    def __init__(self, config_path: str | None, stop: threading.Event | None = None):
        self.config_path = config_path
        self.stop = stop or threading.Event()
        self.reload_requested = threading.Event()
        self.notifier = Notifier()
        self.metrics: Metrics | None = None      # built only with [metrics] listen
        self._last_ping = float("-inf")
        self._last_status = float("-inf")

    def _setup_logging(self, cfg: Config) -> None:
        logsetup.configure(cfg.daemon.log_level, cfg.daemon.log_format)
        threading.excepthook = _log_thread_crash
        c = cfg.credentials
        logsetup.register_secrets([c.access_key_secret, c.security_token, c.broker_token, path_token(c.broker_url),
                                   *(h.secret for h in cfg.hook)])

    def run(self) -> int:
        stop_on_signals(self.stop)
        try:
            cfg = load_config(self.config_path)
            require_watches(cfg)
        except ConfigError as e:
            print(f"{e.label}: {e}", file=sys.stderr)
            return e.exit_code
        self._setup_logging(cfg)
        warning = secret_file_warning(cfg)
        if warning:
            log.warning("config file permissions", problem=warning)
        m = None
        if cfg.metrics.listen:
            from ossyncd.metrics import Metrics
            self.metrics = m = Metrics()
        hooks = Hooks(on_retry=m.on_retry, wrap_store=m.timed_store) if m else Hooks()   # times each UploadPart
        try:
            self.stack = stack = Stack(cfg, hooks)
            stack.state.acquire_daemon_lock()
        except OssyncdError as e:   # the state DB, or a [credentials] section that cannot build a source
            return _cannot_start(e)
        self.cfg = cfg = stack.cfg   # with source = "broker", [oss] as the broker completed it
        stack.state.open_health()
        try:
            interrupted = stack.state.reset_interrupted()
        except StateError as e:
            stack.close(wait=False)
            return _cannot_start(e)
        stack.credentials.start()
        # the watcher reports to the scheduler, which re-arms the watcher: bound late, both built here
        self.watcher = Watcher(lambda *a: sched.on_event(*a), on_rescan=lambda *a: sched.request_rescan(*a))
        self.scheduler = sched = Scheduler(stack.state, stack.uploader, cfg, publish=stack.publish_credentials,
                                           on_done=m.on_done if m else None,
                                           on_rearm=self.watcher.add,        # a root deleted and recreated
                                           source_alive=self.watcher.alive,  # a root whose event thread died
                                           source_info=self.watcher.source,  # inotify, or polling and why
                                           credentials_unavailable=stack.credentials.unavailable)
        stack.on_credentials = sched.wake.set   # credentials back: dispatch the held queue at once
        self.sweeper = Sweeper(stack.store, stack.state, cfg, on_abort=m.on_orphan_aborted if m else None)
        self.deliverer = Deliverer(stack.state, cfg, on_result=m.on_event_result if m else None)
        if m is not None:
            self._start_metrics(m, cfg)
        for w in cfg.watch:
            self.watcher.add(w)
        self.watcher.start()
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())
        loop = threading.Thread(target=sched.run, args=(self.stop,), name="scheduler", daemon=True)
        loop.start()
        sweep = threading.Thread(target=self.sweeper.run, args=(self.stop,), name="sweeper", daemon=True)
        sweep.start()
        deliver = threading.Thread(target=self.deliverer.run, args=(self.stop,), name="events", daemon=True)
        deliver.start()
        self._start_heartbeat(cfg)
        log.info("started", watches=[str(w.path) for w in cfg.watch], bucket=cfg.oss.bucket,
                 state=str(cfg.state.path), resumed=interrupted)
        self.notifier.send("READY=1", f"STATUS={self._status_line()}")
        self._supervise()
        return self._shutdown(loop, sweep, deliver)

    def _shutdown(self, loop: threading.Thread, sweep: threading.Thread, deliver: threading.Thread) -> int:
        """Stop within SHUTDOWN_BUDGET (below the unit's TimeoutStopSec=30), then close the DB;
        anything still running after that is abandoned (its checkpoints stay valid, and a closed
        State refuses every later write)."""
        fatal = self.scheduler.fatal
        if fatal is not None:
            log.error("state DB unusable; exiting so that systemd restarts ossyncd", error=str(fatal))
        self.notifier.send("STOPPING=1")
        log.info("stopping: cancelling in-flight parts; checkpoints are kept")
        deadline = time.monotonic() + SHUTDOWN_BUDGET

        def left(cap: float) -> float:   # each step gets at most `cap` of what remains
            return max(0.0, min(cap, deadline - time.monotonic()))
        _bounded(self.watcher.stop, left(5))
        loop.join(left(5))
        self.scheduler.shutdown(timeout=left(8))
        sweep.join(left(2))
        deliver.join(left(1))
        self.deliverer.shutdown()   # a hook still running is abandoned; its event stays pending
        if self.metrics is not None:
            _bounded(self.metrics.close, left(2))
        _bounded(self.stack.credentials.stop, left(3))
        self.stack.close(wait=False)
        rc = 1 if fatal is not None else 0
        log.info("stopped", exit_code=rc)
        _exit_if_stuck(rc)
        return rc

    def _start_heartbeat(self, cfg: Config) -> None:
        """source = "broker": the fleet heartbeat on its own thread (docs/architecture.md §13)."""
        c = cfg.credentials
        if c.source != "broker":
            return
        if c.broker_heartbeat_interval and not heartbeat_url(c.broker_url, c.broker_heartbeat_url):
            log.warning("no fleet heartbeat: credentials.broker_url does not end in /v1/credentials; set "
                        "credentials.broker_heartbeat_url, or broker_heartbeat_interval = 0 to silence this")
        # started even while off: a reload may turn it on (Heartbeat.run reads the settings each pass)
        beat = Heartbeat(self.stack.state, self.stack.credentials, lambda: self.cfg.credentials)
        threading.Thread(target=beat.run, args=(self.stop,), name="heartbeat", daemon=True).start()

    def _start_metrics(self, m: Metrics, cfg: Config) -> None:
        m.bind(self.stack.state, self.stack.credentials)
        try:
            host, port = m.serve(cfg.metrics.listen)
        except OSError as e:   # uploads matter more than the endpoint: carry on without it
            log.error("metrics endpoint not started", listen=cfg.metrics.listen, error=e.strerror or str(e))
            return
        log.info("metrics listening", address=f"{host}:{port}", url=f"http://{host}:{port}/metrics")

    def _supervise(self) -> None:
        """The main thread: reloads, then one supervise step (watchdog, status)."""
        wd = self.notifier.watchdog_interval
        while not self.stop.wait(min(0.5, wd / 2 if wd else 0.5)):
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self._reload()
            self._supervise_step(time.monotonic())

    def loop_alive(self, now: float) -> bool:
        """The scheduler loop ticks at least every 0.5 s; one silent for a whole watchdog period
        (WATCHDOG_USEC) is stuck, and systemd should restart the daemon."""
        wd = self.notifier.watchdog_interval or 1.0
        return now - self.scheduler.last_tick < max(2.0, wd * 2)

    def _supervise_step(self, now: float) -> None:
        """WATCHDOG=1 every half watchdog period while the loop ticks; STATUS= every 2 s."""
        wd = self.notifier.watchdog_interval
        if wd and now - self._last_ping >= wd and self.loop_alive(now):
            self._last_ping = now
            self.notifier.send("WATCHDOG=1")
        if now - self._last_status >= 2.0 and self.notifier.enabled:   # a count over the table: only for systemd
            self._last_status = now
            self.notifier.send(f"STATUS={self._status_line()}")

    def _status_line(self) -> str:
        problem = getattr(getattr(self, "scheduler", None), "state_error", None)
        try:
            c = self.stack.state.counts() if not problem else {}
        except StateError as e:   # the loop meets it too and decides; the main thread must live on
            problem = str(e)
        if problem:
            return f"state DB error: {problem}"
        rate = getattr(self.scheduler, "throughput", 0.0) if hasattr(self, "scheduler") else 0.0
        paused = " PAUSED" if getattr(self, "scheduler", None) and self.scheduler.paused else ""
        return (f"queued {c.get('queued', 0) + c.get('retry_wait', 0)} / uploading {c.get('uploading', 0)} / "
                f"done {c.get('done', 0)} / failed {c.get('failed', 0)}, {rate:.1f} MiB/s{paused}")

    def _reload(self) -> None:
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        source = None
        try:
            new = load_config(self.config_path)
            require_watches(new)
            if new.state.path != self.cfg.state.path:
                raise ConfigError("state.path: cannot change on reload; restart the daemon")
            if new.credentials.source == "broker":   # what [oss] leaves out stays the broker's
                new = new.model_copy(update={"oss": resolve_oss(new.oss, Registration(
                    self.cfg.oss.bucket, self.cfg.oss.region, self.cfg.oss.endpoint), new.credentials.broker_url)})
            new, restart_keys = restart_only(self.cfg, new)
            if (new.credentials, new.oss.bucket, new.prefixes, new.policy_features) != (
                    self.cfg.credentials, self.cfg.oss.bucket, self.cfg.prefixes, self.cfg.policy_features):
                source = build_source(new)   # e.g. a fixed secret: no restart needed
        except ConfigError as e:
            log.error("reload rejected; the running config stays in force", error=str(e))
            self.notifier.send("READY=1")
            return
        for key in restart_keys:
            log.warning("setting changed; restart to apply", key=key)
        if new.daemon.model_dump(include={"log_level", "log_format"}) != \
                self.cfg.daemon.model_dump(include={"log_level", "log_format"}):
            self._setup_logging(new)
        if source is not None:
            logsetup.register_secrets([new.credentials.access_key_secret, new.credentials.security_token,
                                       new.credentials.broker_token, path_token(new.credentials.broker_url),
                                       *(h.secret for h in new.hook)])
            self.stack.apply_credentials(new, source)
            log.info("credentials replaced", source=new.credentials.source)
        old = {str(w.path): w for w in self.cfg.watch}
        fresh = {str(w.path): w for w in new.watch}

        def apply() -> None:
            for root, w in old.items():
                if root not in fresh or fresh[root] != w:
                    self.watcher.remove(w)
                    self.scheduler.remove_watch(w)
            for root, w in fresh.items():
                if root not in old or old[root] != w:
                    self.scheduler.add_watch(w)
                    self.watcher.add(w)
            self.scheduler.cfg = new
            self.sweeper.cfg = new
            self.stack.apply_upload_settings(new.upload)
            self.stack.use_config(new)
            self.deliverer.use_config(new)
        self.scheduler.call_soon(apply)
        self.cfg = new
        log.info("config reloaded", watches=list(fresh))
        self.notifier.send("READY=1")


def run(config_path: str | None, stop: threading.Event | None = None) -> int:
    return Daemon(config_path, stop).run()
