"""The upload stack built from a config: state, credentials, store (+ retries), uploader.

`ossyncd upload` and `ossyncd run` both use this, so one-shot and daemon uploads go
through exactly the same code and state.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ossyncd.body import RateLimiter
from ossyncd.config import Config, OssConfig, UploadConfig, WatchConfig
from ossyncd.credentials import RotatingCredentials, build_source
from ossyncd.paths import object_key
from ossyncd.retry import Backoff, RetryingStore
from ossyncd.state import State
from ossyncd.store import OssStore, object_url
from ossyncd.uploader import Uploader

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


def make_credentials(cfg: Config) -> RotatingCredentials:
    """The configured source behind the rotating provider (raises CredentialsError)."""
    c = cfg.credentials
    return RotatingCredentials(build_source(c, bucket=cfg.oss.bucket, prefixes=cfg.prefixes),
                               min_backoff=c.retry_backoff, max_backoff=c.retry_backoff_max)


class Engine:
    def __init__(self, cfg: Config, *, on_progress=None, on_retry=None):
        self.cfg = cfg
        self.state = State(cfg.state.path)
        self.credentials = make_credentials(cfg)
        up = cfg.upload
        self.part_pool = ThreadPoolExecutor(up.parallel_parts, thread_name_prefix="part")
        self.oss = OssStore(cfg.oss, self.credentials, pool_size=up.parallel_parts + up.max_files_in_flight + 2)
        self.oss.on_verification = self._record_verification
        self.store = RetryingStore(self.oss, self.credentials, attempts=up.request_retries,
                                   backoff=Backoff(up.retry_backoff, up.retry_backoff_max), on_retry=on_retry)
        self.limiter = RateLimiter(up.bandwidth_limit)   # always there: a reload may set a limit
        self.uploader = Uploader(self.state, self.store, up, part_pool=self.part_pool, limiter=self.limiter,
                                 url_for=lambda key: object_url(cfg.oss, key), on_progress=on_progress)

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

    def swap_credentials(self, credentials: RotatingCredentials) -> None:
        """Use new credentials from the next request on (config reload); uploads carry on."""
        old = self.credentials
        self.credentials = credentials
        self.oss.provider.credentials = credentials
        self.store.credentials = credentials
        credentials.on_change = old.on_change
        credentials.start()
        old.stop()

    def watch_for(self, path: str) -> WatchConfig | None:
        p = Path(path)
        for w in self.cfg.watch:
            if p == w.path or w.path in p.parents:
                return w
        return None

    def key_for(self, path: str, prefix: str | None = None) -> tuple[str, str]:
        """(watch root, object key): inside a watch root the key is its prefix plus the
        relative path; elsewhere `prefix` (default "") plus the file name."""
        w = self.watch_for(path)
        if w is not None and prefix is None:
            return str(w.path), object_key(w.prefix, os.path.relpath(path, w.path))
        return "", object_key(prefix or "", os.path.basename(path))

    def close(self, wait: bool = True) -> None:
        """wait=False: parts still in a request are abandoned (the daemon's bounded shutdown)."""
        self.credentials.stop()
        self.part_pool.shutdown(wait=wait, cancel_futures=True)
        self.state.close()
