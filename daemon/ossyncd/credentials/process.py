"""The ``process`` source (the CLI profile mode ``External``): run a command, without a shell
and with a timeout, and read the credentials it prints as JSON on stdout, in the
alibabacloud-credentials format (docs/credentials.md):

    {"mode": "AK" | "StsToken", "access_key_id": ..., "access_key_secret": ...,
     "sts_token": ..., "expiration": "2026-01-01T00:00:00Z"}

The command's stderr is never logged as is: only a short tail with anything that looks like
a key or token replaced."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

from .base import REDACTED, Snapshot, SourceBase, ci_get, parse_expiration

_SECRETISH = re.compile(r"[A-Za-z0-9+/=_.\-]{16,}")


def redact_text(text: str, limit: int = 120) -> str:
    """The tail of a program's stderr, one line, with every long key-like run replaced."""
    line = " ".join(text.split())[-limit:]
    return _SECRETISH.sub(REDACTED, line)


class ProcessSource(SourceBase):
    name = "process"

    def __init__(self, *, command: list[str], timeout: float = 10.0, where: str = "credentials.command"):
        self.command = list(command)
        self.timeout = timeout
        self.where = where          # the key or file the command came from, for messages
        self._seen: tuple[str, ...] = ()

    def _secrets(self):
        return self._seen

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        try:
            proc.communicate(timeout=2)
        except subprocess.TimeoutExpired:   # pragma: no cover - a grandchild escaped its group
            pass

    def fetch(self) -> Snapshot:
        """One run. CredentialsError, transient for a timeout or a non-zero exit (the helper may
        recover), permanent for a command that cannot start or prints unusable JSON."""
        prog = self.command[0]
        try:
            # its own process group, so a timeout also ends what it started (that would keep
            # the pipes open and communicate() waiting)
            proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, shell=False, start_new_session=True)
        except OSError as e:
            raise self._err(f"credentials command {prog} ({self.where}) cannot be run: {e.strerror}; "
                            "fix the path or permissions", transient=False, code="NotRunnable") from None
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            raise self._err(f"credentials command {prog} ({self.where}) did not finish within "
                            f"{self.timeout:g}s and was killed; will retry", transient=True, code="Timeout") from None
        if proc.returncode != 0:
            tail = redact_text(err.decode("utf-8", "replace"))
            raise self._err(f"credentials command {prog} ({self.where}) exited with status {proc.returncode}"
                            f"{': ' + tail if tail else ''}; will retry", transient=True, code="ExitStatus")
        try:
            doc = json.loads(out.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise self._err(f"credentials command {prog} ({self.where}) printed no valid JSON{where}; it must "
                            "print {\"mode\": \"StsToken\", \"access_key_id\": ..., ...}", transient=False,
                            code="BadOutput") from None
        if not isinstance(doc, dict):
            raise self._err(f"credentials command {prog} ({self.where}) printed JSON that is not an object",
                            transient=False, code="BadOutput")
        ak, sk = ci_get(doc, "access_key_id"), ci_get(doc, "access_key_secret")
        token, exp = ci_get(doc, "sts_token"), ci_get(doc, "expiration")
        self._seen = tuple(v for v in (sk, token) if isinstance(v, str))
        if not (isinstance(ak, str) and ak and isinstance(sk, str) and sk):
            raise self._err(f"credentials command {prog} ({self.where}) printed no access_key_id / "
                            "access_key_secret", transient=False, code="BadOutput")
        expires_at = None
        if exp not in (None, ""):
            try:
                expires_at = parse_expiration(exp)
            except ValueError:
                raise self._err(f"credentials command {prog} ({self.where}) printed an expiration that is "
                                "not ISO-8601 or epoch seconds", transient=False, code="BadOutput") from None
        return Snapshot(ak, sk, token if isinstance(token, str) and token else None, expires_at)
