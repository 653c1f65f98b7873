"""Prometheus metrics (`[metrics] listen = "127.0.0.1:9464"`). The only prometheus_client importer.

Event counters are fed by hooks (scheduler.on_done, RetryingStore.on_retry, a timing
wrapper around the single-attempt store, the orphan sweep); gauges that describe state are
read from the state DB at scrape time, so they are right even for work done before this
process started. Everything lives in a dedicated CollectorRegistry (no global state, no
default process/GC collectors: /proc/stat is hidden by the unit's ProcSubset=pid).

    ossyncd_files{state}                           gauge    files per state (state DB)
    ossyncd_queue_depth                            gauge    queued + retry_wait files
    ossyncd_paused                                 gauge    1 while paused
    ossyncd_uploaded_bytes_total                   counter  bytes of files uploaded and verified
    ossyncd_uploads_completed_total                counter  files uploaded and verified
    ossyncd_uploads_failed_total                   counter  files failed permanently
    ossyncd_request_retries_total{op}              counter  OSS requests retried after a transient error
    ossyncd_part_upload_seconds                    histogram successful UploadPart requests
    ossyncd_orphan_uploads_aborted_total           counter  multipart uploads aborted by the orphan sweep
    ossyncd_credentials_expiry_timestamp_seconds   gauge    when the current credentials expire
    ossyncd_last_upload_timestamp_seconds          gauge    last verified upload by this process
    ossyncd_events_delivered_total{hook}           counter  hook deliveries that succeeded
    ossyncd_events_failed_total{hook}              counter  hook delivery attempts that failed
    ossyncd_events{state}                          gauge    outbox rows per state: pending, delivered, dead
    ossyncd_events_oldest_pending_age_seconds      gauge    age of the oldest undelivered event (0: none)
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from ossyncd.config import parse_listen
from ossyncd.errors import StateError
from ossyncd.model import CancelFlag, ObjectInfo, OpenUpload, PartRow, ServerPart, WriteResult
from ossyncd.state import DELIVERY_STATES, STATES

if TYPE_CHECKING:
    from ossyncd.body import Body
    from ossyncd.store import ObjectStore

log = structlog.get_logger(__name__)
PART_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _StateCollector:
    """Gauges read from the state DB and the credentials at scrape time."""

    def __init__(self, metrics: "Metrics"):
        self._m = metrics

    def collect(self):
        state, credentials = self._m.state, self._m.credentials
        try:
            counts = state.counts() if state is not None else None
            paused = state is not None and state.get_meta("paused") == "1"
        except StateError:   # the scheduler reports it (log, status); the scrape still serves the rest
            counts = None
        if counts is not None:
            files = GaugeMetricFamily("ossyncd_files", "Files per state", labels=["state"])
            for s in STATES:
                files.add_metric([s], counts.get(s, 0))
            yield files
            yield GaugeMetricFamily("ossyncd_queue_depth", "Files waiting for an upload (queued + retry_wait)",
                                    value=counts.get("queued", 0) + counts.get("retry_wait", 0))
            yield GaugeMetricFamily("ossyncd_paused", "1 while uploads are paused (ossyncd pause)",
                                    value=1 if paused else 0)
        try:
            ev = state.event_counts() if state is not None else None
            oldest = state.oldest_pending_event() if state is not None else None
        except StateError:
            ev = None
        if ev is not None:
            events = GaugeMetricFamily("ossyncd_events", "Hook deliveries per state (the outbox)", labels=["state"])
            for s in DELIVERY_STATES:
                events.add_metric([s], ev.get(s, 0))
            yield events
            yield GaugeMetricFamily("ossyncd_events_oldest_pending_age_seconds",
                                    "Age of the oldest event not yet delivered (0: none pending)",
                                    value=max(0.0, time.time() - oldest) if oldest is not None else 0.0)
        if credentials is not None:
            expires = credentials.status().get("expires_at")
            if expires:
                ts = datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp()
                yield GaugeMetricFamily("ossyncd_credentials_expiry_timestamp_seconds",
                                        "Unix time when the current credentials expire", value=ts)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.state = None
        self.credentials = None
        self.uploaded_bytes = Counter("ossyncd_uploaded_bytes", "Bytes of files uploaded and verified", registry=r)
        self.completed = Counter("ossyncd_uploads_completed", "Files uploaded and verified", registry=r)
        self.failed = Counter("ossyncd_uploads_failed", "Files that failed permanently", registry=r)
        self.retries = Counter("ossyncd_request_retries", "OSS requests retried after a transient error",
                               ["op"], registry=r)
        self.part_seconds = Histogram("ossyncd_part_upload_seconds", "Duration of successful UploadPart requests",
                                      buckets=PART_BUCKETS, registry=r)
        self.orphans = Counter("ossyncd_orphan_uploads_aborted", "Multipart uploads aborted by the orphan sweep",
                               registry=r)
        self.last_upload = Gauge("ossyncd_last_upload_timestamp_seconds",
                                 "Unix time of the last verified upload by this process", registry=r)
        self.events_delivered = Counter("ossyncd_events_delivered", "Hook deliveries that succeeded", ["hook"],
                                        registry=r)
        self.events_failed = Counter("ossyncd_events_failed", "Hook delivery attempts that failed", ["hook"],
                                     registry=r)
        r.register(_StateCollector(self))
        self._server = None

    def bind(self, state, credentials) -> None:
        self.state = state
        self.credentials = credentials

    # -- hooks -----------------------------------------------------------------------------

    def on_done(self, row, outcome) -> None:
        if outcome.state == "done" and not outcome.unchanged:   # a chmod sent nothing
            self.completed.inc()
            self.uploaded_bytes.inc(row.size)
            self.last_upload.set(time.time())
        elif outcome.state == "failed":
            self.failed.inc()

    def on_event_result(self, hook: str, ok: bool) -> None:
        (self.events_delivered if ok else self.events_failed).labels(hook).inc()

    def on_retry(self, op: str, exc: Exception) -> None:
        self.retries.labels(op).inc()

    def on_orphan_aborted(self, upload) -> None:
        self.orphans.inc()

    def timed_store(self, store: ObjectStore) -> "_TimedStore":
        return _TimedStore(store, self.part_seconds.observe)

    # -- serving ---------------------------------------------------------------------------

    def serve(self, listen: str) -> tuple[str, int]:
        """Start the HTTP endpoint; returns the bound (host, port) (port 0 picks a free one)."""
        host, port = parse_listen(listen)
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _TimedStore:
    """Wraps a single-attempt ObjectStore and times each successful UploadPart; every other
    method is the inner store's, unchanged."""

    def __init__(self, inner: ObjectStore, observe: Callable[[float], None]):
        self._inner = inner
        self._observe = observe

    def put(self, key: str, body: Body, *, headers: dict[str, str] | None = None,
            cancel: CancelFlag | None = None) -> WriteResult:
        return self._inner.put(key, body, headers=headers, cancel=cancel)

    def init_multipart(self, key: str, *, headers: dict[str, str] | None = None,
                       cancel: CancelFlag | None = None) -> str:
        return self._inner.init_multipart(key, headers=headers, cancel=cancel)

    def upload_part(self, key: str, upload_id: str, number: int, body: Body, *,
                    cancel: CancelFlag | None = None) -> WriteResult:
        t0 = time.monotonic()
        result = self._inner.upload_part(key, upload_id, number, body, cancel=cancel)
        self._observe(time.monotonic() - t0)
        return result

    def complete(self, key: str, upload_id: str, parts: list[PartRow], *, headers: dict[str, str] | None = None,
                 cancel: CancelFlag | None = None) -> WriteResult:
        return self._inner.complete(key, upload_id, parts, headers=headers, cancel=cancel)

    def head(self, key: str, *, cancel: CancelFlag | None = None) -> ObjectInfo | None:
        return self._inner.head(key, cancel=cancel)

    def list_parts(self, key: str, upload_id: str, *, cancel: CancelFlag | None = None) -> list[ServerPart]:
        return self._inner.list_parts(key, upload_id, cancel=cancel)

    def abort(self, key: str, upload_id: str, *, cancel: CancelFlag | None = None) -> None:
        self._inner.abort(key, upload_id, cancel=cancel)

    def list_uploads(self, prefix: str, *, cancel: CancelFlag | None = None) -> list[OpenUpload]:
        return self._inner.list_uploads(prefix, cancel=cancel)

    def last_credentials(self) -> Any:
        return self._inner.last_credentials()

    def verification_mode(self) -> str | None:
        return self._inner.verification_mode()
