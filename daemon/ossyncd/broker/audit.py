"""One JSON line per decision, to broker.audit_log and to the structlog log (`broker.issued`,
`broker.denied`). The line never holds the client's token, an AccessKeySecret or a
SecurityToken: only the masked STS AccessKeyId (credentials.base.mask_key_id, as in the daemon's log)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from ossyncd import log as logsetup
from ossyncd.credentials.base import iso8601, mask_key_id
from ossyncd.errors import StateError

log = logsetup.get_logger("ossyncd.broker")


class Audit:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateError(f"broker.audit_log: cannot open {self.path}: {e.strerror}; check the directory "
                             "exists and the broker's user may write it", clearable=True) from None

    def record(self, *, decision: str, client: str | None, remote: str, reason: str = "", session_name: str = "",
               key_id: str | None = None, expiry: float | None = None, policy_sha256: str = "",
               sts_code: str | None = None, cached: bool | None = None, status: int = 200) -> dict:
        line = {"ts": iso8601(time.time()), "decision": decision, "status": status, "client": client,
                "remote": remote, "session_name": session_name, "access_key_id": mask_key_id(key_id),
                "expiry": iso8601(expiry), "policy_sha256": policy_sha256, "sts_code": sts_code,
                "reason": reason, "cached": cached}
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                os.write(self._fd, data)   # one write per line: O_APPEND keeps lines whole
            except OSError as e:
                log.error("broker.audit_failed", path=str(self.path), error=e.strerror)
        (log.info if decision == "allow" else log.warning)(
            "broker.issued" if decision == "allow" else "broker.denied",
            **{k: v for k, v in line.items() if k != "ts"})
        return line

    def close(self) -> None:
        os.close(self._fd)
