"""systemd's notify protocol (sd_notify): one datagram per message to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self):
        addr = os.environ.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]   # abstract namespace
        self._addr = addr or None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) if addr else None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        wd = int(usec) / 1e6 if usec.isdigit() and (not pid or pid == str(os.getpid())) else None
        self.watchdog_interval = wd / 2 if wd else None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._addr)
        except OSError:
            pass  # systemd going away must not take the daemon down
