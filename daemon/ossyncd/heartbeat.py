"""The fleet heartbeat: with source = "broker", POST this host's counts to the broker after each
credentials refresh and at least every credentials.broker_heartbeat_interval seconds (the body
and answers are the broker's contract, docs/broker.md; docs/architecture.md §13).

Its own thread, so a slow or absent broker never holds up an upload. A failure is logged once
per change of reason and kept in the state DB's meta `heartbeat` for `ossyncd status`. The
broker token is sent as the credentials fetch sends it and never logged (a token in the URL's
path is masked in every line)."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Callable

import requests
import structlog

from ossyncd import __version__
from ossyncd.config import CredentialsConfig
from ossyncd.credentials import RotatingCredentials
from ossyncd.credentials.base import iso8601, net_reason
from ossyncd.fleet import heartbeat_url
from ossyncd.state import State

log = structlog.get_logger(__name__)
POLL = 0.5   # seconds between looks at the credentials' last refresh


def shown_url(url: str) -> str:
    """The URL for logs and status: a token path segment after /v1/heartbeat is masked."""
    head, sep, tail = url.partition("/v1/heartbeat/")
    return f"{head}/v1/heartbeat/<token>" if sep and tail else url


class Heartbeat:
    def __init__(self, state: State, credentials: RotatingCredentials,
                 settings: Callable[[], CredentialsConfig], *, clock: Callable[[], float] = time.time):
        """``settings``: the [credentials] section in force (a reload changes it)."""
        self.state = state
        self.credentials = credentials
        self.settings = settings
        self.clock = clock
        self._session = requests.Session()
        self._problem: str | None = None      # the last failure's reason; None after a success
        self._problem_since: float | None = None
        self.last_sent_at: float | None = None

    def body(self) -> dict:
        counts = self.state.counts()
        return {"version": __version__, "host": socket.gethostname(), "states": counts,
                "queue": counts.get("queued", 0) + counts.get("retry_wait", 0),
                "failures": counts.get("failed", 0), "last_upload": iso8601(self.state.last_upload_at()),
                "credential_expiry": self.credentials.status().get("expires_at"),
                "sent_at": iso8601(self.clock())}

    def send(self) -> bool:
        """One POST; the outcome is logged (once per change) and published. Never raises."""
        c = self.settings()
        url = heartbeat_url(c.broker_url, c.broker_heartbeat_url)
        headers_for = getattr(self.credentials.source, "request_headers", None)
        problem = None
        try:
            headers = {**(headers_for() if callable(headers_for) else {}), "Content-Type": "application/json"}
            r = self._session.post(url, data=json.dumps(self.body()), headers=headers,
                                   timeout=(c.timeout_seconds, c.timeout_seconds))
            if not 200 <= r.status_code < 300:
                problem = f"HTTP {r.status_code}{_said(r)}"
        except requests.exceptions.RequestException as e:
            problem = f"unreachable: {net_reason(e, c.timeout_seconds)}"
        except Exception as e:   # the state DB (busy, closed at shutdown) or a bug: the loop lives on
            problem = f"not sent: {type(e).__name__}"
        now = self.clock()
        if problem is None:
            self.last_sent_at = now
            if self._problem is not None:
                log.info("heartbeat.recovered", url=shown_url(url))
            self._problem = self._problem_since = None
        elif problem != self._problem:
            log.warning("heartbeat.failed", url=shown_url(url), error=problem,
                        hint="the broker's `status` misses this host until it succeeds; uploads carry on")
            self._problem, self._problem_since = problem, self._problem_since or now
        self._publish(url)
        return problem is None

    def _publish(self, url: str) -> None:
        try:
            self.state.set_meta("heartbeat", json.dumps({
                "url": shown_url(url), "last_sent_at": iso8601(self.last_sent_at),
                "error": self._problem, "error_since": iso8601(self._problem_since)}))
        except Exception as e:   # the next send publishes again
            log.error("heartbeat.status_not_published", error=repr(e))

    def run(self, stop: threading.Event) -> None:
        """Send after each credentials refresh and when the interval is up, until `stop`."""
        seen = None
        due = 0.0
        while not stop.is_set():
            try:
                c = self.settings()
                refreshed = self.credentials.status().get("last_refresh_at")
                now = self.clock()
                if (c.source == "broker" and c.broker_heartbeat_interval > 0
                        and heartbeat_url(c.broker_url, c.broker_heartbeat_url)
                        and (refreshed != seen or now >= due)):
                    seen = refreshed
                    self.send()
                    due = self.clock() + c.broker_heartbeat_interval
            except Exception as e:   # never end unseen
                log.error("heartbeat.loop_error", error=repr(e))
            stop.wait(POLL)


def _said(r: requests.Response) -> str:
    try:
        doc = r.json()
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    parts = [str(doc[k])[:120] for k in ("Code", "Message") if isinstance(doc.get(k), str)]
    return f" ({': '.join(parts)})" if parts else ""
