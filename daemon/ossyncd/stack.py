"""The composition root: the upload stack built from a config and explicit hooks."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import structlog

from ossyncd.body import RateLimiter
from ossyncd.config import Config, ObjectSpec, OssConfig, UploadConfig, WatchConfig
from ossyncd.credentials import CredentialsError, RotatingCredentials
from ossyncd.credentials import build_source as _source_for
from ossyncd.credentials.http import Registration
from ossyncd.errors import ConfigError, FileGone, FileUnreadable
from ossyncd.events import route
from ossyncd.fleet import denied_reason, resolve_oss, uncovered_watches
from ossyncd.model import Identity
from ossyncd.objectspec import FileFacts, class_warning, object_key_for
from ossyncd.paths import check_key
from ossyncd.retry import Backoff, RetryingStore
from ossyncd.state import FileRow, State
from ossyncd.store import OssStore, object_url
from ossyncd.uploader import Outcome, Uploader, stat_identity

log = structlog.get_logger(__name__)

# Built once at start: the thread pools and the OSS client (sized and pointed by these keys), and
# the metrics endpoint.
RESTART_ONLY = {"upload": ("parallel_parts", "max_files_in_flight"), "oss": tuple(OssConfig.model_fields),
                "metrics": ("listen",)}


def restart_only(running: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with every RESTART_ONLY setting kept at its running value, and the keys that
    differed ("upload.parallel_parts", ...), so a reload applies all the rest."""
    changed, kept = [], {}
    for section, keys in RESTART_ONLY.items():
        old, fresh = getattr(running, section), getattr(new, section)
        diff = {k: getattr(old, k) for k in keys if getattr(old, k) != getattr(fresh, k)}
        if diff:
            changed += [f"{section}.{k}" for k in diff]
            kept[section] = fresh.model_copy(update=diff)
    return (new.model_copy(update=kept) if kept else new), changed


@dataclass(frozen=True)
class Hooks:
    """What the caller wants told, passed in when the stack is built (nothing is patched in
    afterwards)."""

    on_progress: Callable[[int, int, int], None] | None = None   # (file_id, bytes done, total): live bars
    on_retry: Callable[[str, Exception], None] | None = None     # a request retried (metrics)
    wrap_store: Callable[[Any], Any] | None = None                # a decorator around each single attempt (metrics timing)


def build_source(cfg: Config):
    """The configured credentials source. One that cannot be built is a ConfigError (its
    message names the credentials.* key); fetching comes later."""
    try:
        return _source_for(cfg.credentials, bucket=cfg.oss.bucket, prefixes=cfg.prefixes,
                           features=cfg.policy_features)
    except CredentialsError as e:
        raise ConfigError(str(e)) from None


def build_credentials(cfg: Config, on_change: Callable[[], None] | None = None) -> RotatingCredentials:
    c = cfg.credentials
    return RotatingCredentials(build_source(cfg), min_backoff=c.retry_backoff, max_backoff=c.retry_backoff_max,
                               on_change=on_change)


def with_broker_oss(cfg: Config, creds: RotatingCredentials) -> Config:
    """With source = "broker": `cfg` with [oss] completed from the broker's answer (fetched now
    if none came yet; fleet.resolve_oss). Any other source: `cfg` as it is. ConfigError for a
    value that differs from the broker's; CredentialsError when the broker must answer (an
    [oss] left incomplete) and does not."""
    if cfg.credentials.source != "broker":
        return cfg
    c, oss = cfg.credentials, cfg.oss
    reg = getattr(creds.source, "registration", None)
    if reg is None:
        try:
            creds.current()
        except CredentialsError as e:
            if oss.endpoint and oss.bucket and (oss.region or oss.signature == "v1"):
                log.warning("credentials broker not answering at start; [oss] as configured",
                            error=str(e))
                return cfg
            raise CredentialsError(f"{e} - [oss] leaves out endpoint, bucket or region, so the broker must "
                                   "answer once at start (or set them in [oss])", transient=e.transient,
                                   source=e.source, code=e.code) from None
        reg = getattr(creds.source, "registration", None)
    if reg is None:   # pragma: no cover - a broker source always records it
        return cfg
    return cfg.model_copy(update={"oss": resolve_oss(oss, reg, c.broker_url)})


def build_store(cfg: Config, creds: RotatingCredentials, *, pool_size: int = 8,
                on_verification: Callable[[str], None] | None = None) -> OssStore:
    """The single-attempt OSS client (`url --sign` and `check-config` use it bare)."""
    return OssStore(with_broker_oss(cfg, creds).oss, creds, pool_size=pool_size, on_verification=on_verification)


class Stack:
    """The upload stack, composed in one place (docs/architecture.md §2):

        state ─ credentials (rotating, status published to state)
        store = RetryingStore(wrap_store(OssStore))      retries decorate the single attempt
        uploader(state, store, limiter, part pool)

    `ossyncd run` and `ossyncd upload` both build it, so one-shot and daemon uploads go
    through exactly the same code and state. A reload changes it only through its methods."""

    def __init__(self, cfg: Config, hooks: Hooks = Hooks()):
        self.cfg = cfg
        self.state = State(cfg.state.path)
        self.state.router = route(cfg)   # [[hook]]s: which state changes are written to the outbox
        self._creds_lock = threading.Lock()
        self.on_credentials: Callable[[], None] | None = None   # after every fetch (the scheduler's wake)
        self.credentials = build_credentials(cfg, on_change=self._credentials_changed)
        self._told: set[tuple[str, str, tuple[str, ...]]] = set()
        self.cfg = cfg = with_broker_oss(cfg, self.credentials)   # [oss] from the broker (§13)
        self.check_registration()
        up = cfg.upload
        self.part_pool = ThreadPoolExecutor(up.parallel_parts, thread_name_prefix="part")
        oss = build_store(cfg, self.credentials, pool_size=up.parallel_parts + up.max_files_in_flight + 2,
                          on_verification=self._record_verification)
        self.store = RetryingStore(hooks.wrap_store(oss) if hooks.wrap_store else oss, self.credentials,
                                   attempts=up.request_retries, backoff=Backoff(up.retry_backoff, up.retry_backoff_max),
                                   on_retry=hooks.on_retry)
        self.limiter = RateLimiter(up.bandwidth_limit)   # always there: a reload may set a limit
        self.uploader = Uploader(self.state, self.store, up, part_pool=self.part_pool, limiter=self.limiter,
                                 url_for=lambda key: object_url(cfg.oss, key), on_progress=hooks.on_progress,
                                 spec_for=self.spec_for, denied_reason=self.denied_reason)
        for w in cfg.watch or ():
            warning = class_warning(w.object)
            if warning:
                log.warning("storage class minimums", watch=str(w.path), problem=warning)

    def _credentials_changed(self) -> None:
        self.publish_credentials()
        self.check_registration()
        if self.on_credentials is not None:
            self.on_credentials()

    def registration(self) -> Registration | None:
        """What the broker's last answer said about this host (source = "broker"), else None."""
        return getattr(self.credentials.source, "registration", None)

    def check_registration(self) -> None:
        """At start and after each refresh: one warning per watch whose keys may fall outside the
        broker's registered prefixes (again only when the prefixes change), and one error when the
        broker now names another bucket or region than the running one."""
        reg = self.registration()
        cfg = getattr(self, "cfg", None)
        if reg is None or cfg is None:
            return
        for key in ("bucket", "region"):
            theirs, running = getattr(reg, key), getattr(cfg.oss, key)
            # `running` is "" only during the first fetch at start, before with_broker_oss filled it
            if theirs and running and theirs != running and ("moved", key, (theirs,)) not in self._told:
                self._told.add(("moved", key, (theirs,)))
                log.error("credentials broker names another oss value; restart to apply", key=f"oss.{key}",
                          running=running, broker=theirs)
        if reg.prefixes is None:
            return
        for w, prefix in uncovered_watches(cfg.watch, reg.prefixes):
            mark = (str(w.path), prefix, reg.prefixes)
            if mark not in self._told:
                self._told.add(mark)
                log.warning("watch prefix outside the broker registration", watch=f"watch[{w.index}] {w.path}",
                            key_prefix=prefix, broker_prefixes=list(reg.prefixes),
                            fix="register the prefix with `ossyncd broker add-client ... --prefix` at the broker, "
                                "or change watch.prefix")

    def denied_reason(self, key: str) -> str | None:
        """For an AccessDenied on `key`: the broker registration's explanation, if it has one."""
        reg = self.registration()
        return denied_reason(key, reg.prefixes) if reg is not None else None

    def publish_credentials(self) -> None:
        """For `ossyncd status`: after every credentials fetch, and every second from the daemon's
        loop. Read and written under one lock, so an older status never overwrites a newer one."""
        with self._creds_lock:
            reg = self.registration()
            extra = {"registration": dataclasses.asdict(reg)} if reg is not None else {}
            self.state.set_meta("credentials", json.dumps({**self.credentials.status(), **extra}))

    def _record_verification(self, mode: str) -> None:
        """For `ossyncd status`: how this run verifies uploads (the server's CRC64 capability)."""
        from ossyncd.status import iso
        self.state.set_meta("verification", json.dumps({"mode": mode, "detected_at": iso(time.time())}))

    def apply_upload_settings(self, up: UploadConfig) -> None:
        """A reloaded [upload] section, from the next request on: bandwidth limit, request
        retries and their backoff, the file retry delay, part sizes and thresholds. The pool
        sizes stay as started (see restart_only)."""
        self.limiter.set_rate(up.bandwidth_limit)
        self.store.attempts = up.request_retries
        self.store.backoff = Backoff(up.retry_backoff, up.retry_backoff_max)
        self.uploader.cfg = up
        self.uploader.backoff = Backoff(up.file_retry_delay, up.file_retry_delay_max)

    def apply_credentials(self, cfg: Config, source) -> None:
        """A reloaded [credentials] section (a fixed secret, a new role; `source` from
        build_source(cfg)): used from the next request on, uploads carry on."""
        c = cfg.credentials
        self.credentials.replace_source(source, min_backoff=c.retry_backoff, max_backoff=c.retry_backoff_max)
        self.publish_credentials()

    def use_config(self, cfg: Config) -> None:
        self.cfg = cfg
        self.state.router = route(cfg)

    def watch_for(self, path: str) -> WatchConfig | None:
        p = Path(path)
        for w in self.cfg.watch:
            if p == w.path or w.path in p.parents:
                return w
        return None

    def spec_for(self, root: str) -> ObjectSpec:
        """What objects of the watch at `root` get ([upload]'s defaults outside every watch)."""
        for w in self.cfg.watch:
            if str(w.path) == root:
                return w.object
        return self.cfg.object

    def key_for(self, path: str, prefix: str | None = None, st: os.stat_result | None = None) -> tuple[str, str]:
        """(watch root, object key): inside a watch root its key_template (default: the prefix
        plus the relative path); elsewhere `prefix` (default "") plus the file name."""
        w = self.watch_for(path)
        mtime_ns = st.st_mtime_ns if st is not None else 0
        if w is not None and prefix is None:
            facts = FileFacts(os.path.relpath(path, w.path), st.st_size if st else 0, mtime_ns)
            return str(w.path), object_key_for(w.object, w.prefix, facts)
        facts = FileFacts(os.path.basename(path), st.st_size if st else 0, mtime_ns)
        return "", object_key_for(self.cfg.object, prefix or "", facts)

    def enqueue(self, path: str, prefix: str | None = None) -> tuple[FileRow, bool]:
        """A file named on the command line, recorded and queued as the scheduler queues a
        settled one. Returns (row, True) to upload, (row, False) when this version is already
        `done`. Raises FileGone / FileUnreadable for what cannot be uploaded (a bad key is
        recorded as skipped first)."""
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError as e:
            raise FileGone(path, f"{e.strerror}; nothing uploaded") from None
        except OSError as e:
            raise FileUnreadable(path, f"{e.strerror}; nothing uploaded") from None
        if not stat.S_ISREG(st.st_mode):
            raise FileUnreadable(path, "not a regular file; nothing uploaded")
        watch, key = self.key_for(path, prefix, st)
        reason = check_key(key)
        if reason:
            self.state.mark_skipped(path, watch, reason)
            raise FileUnreadable(path, reason)
        row, new = self.state.observe(path, watch, key, Identity.of(st))
        if row.state == "done" and not new:
            return row, False
        if row.state != "queued":
            self.state.transition(row.id, "queued")
            row = self.state.get_by_id(row.id) or row
        return row, True

    def upload_now(self, row: FileRow, on_new_version: Callable[[FileRow], None] | None = None,
                   tries: int = 3) -> tuple[FileRow, Outcome]:
        """Upload one queued file. A file that changed mid-upload is recorded as its new version
        and sent again, a few times at most (the daemon lets it settle instead)."""
        outcome = self.uploader.run(row)
        for _ in range(tries - 1):
            if outcome.state != "queued" or outcome.cancelled:
                break
            try:
                identity = stat_identity(row.path)
            except FileNotFoundError:
                break
            row, _ = self.state.observe(row.path, row.watch, row.key, identity)
            if on_new_version is not None:
                on_new_version(row)
            outcome = self.uploader.run(row)
        return row, outcome

    def close(self, wait: bool = True) -> None:
        """wait=False: parts still in a request are abandoned (the daemon's bounded shutdown)."""
        self.credentials.stop()
        self.part_pool.shutdown(wait=wait, cancel_futures=True)
        self.state.close()
