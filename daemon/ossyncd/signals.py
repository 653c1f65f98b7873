"""The daemon's stop signals, kept apart from ossyncd.app so `ossyncd run` installs them
before it imports the daemon (oss2, structlog, watchdog: about a second on a busy machine)."""

from __future__ import annotations

import signal
import threading


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set `stop`: a stop while the daemon is still starting is a clean
    exit 0 once it is up (it shuts down at once), never the default kill."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
