"""Read the state DB (as a concurrent reader) and render `status` and `list` (on the consoles
of ossyncd.output, which never read user data as markup)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from rich.console import Console
from rich.table import Table

from ossyncd.config import Config
from ossyncd.output import styled, tsv
from ossyncd.state import STATES, FileRow, State


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z") if ts else None


def file_json(f: FileRow) -> dict:
    return {"path": f.path, "key": f.key, "state": f.state, "size": f.size, "url": f.url,
            "crc64": str(f.crc64) if f.crc64 is not None else None, "etag": f.etag, "error": f.error,
            "attempts": f.attempts, "uploaded_at": iso(f.uploaded_at), "mode": f.mode,
            "next_attempt_at": iso(f.next_attempt_at)}


def status_dict(cfg: Config, state: State | None) -> dict:
    pid = State.lock_holder(cfg.state.path)
    counts = {s: 0 for s in STATES}
    in_flight, failures, creds, paused = [], [], {}, False
    if state is not None:
        counts.update(state.counts())
        in_flight = [{"path": f.path, "key": f.key, "bytes_done": f.bytes_done, "bytes_total": f.size}
                     for f in state.files("uploading")]
        failures = [{"path": f.path, "state": f.state, "error": f.error, "when": iso(f.updated_at),
                     "next_attempt_at": iso(f.next_attempt_at)} for f in state.recent_failures(10)]
        creds = json.loads(state.get_meta("credentials") or "{}")
        paused = state.get_meta("paused") == "1"
    return {
        "daemon": {"running": pid is not None, "pid": pid if pid and pid > 0 else None,
                   "paused": paused and pid is not None},
        "counts": counts,
        "in_flight": in_flight,
        "failures": failures,
        "credentials": {"source": cfg.credentials.source, "expires_at": creds.get("expires_at"),
                        "error": creds.get("last_error"), "next_attempt_at": creds.get("next_attempt_at")},
        "throughput_mib_s": json.loads(state.get_meta("throughput") or "null") if state is not None else None,
        "state_db": str(cfg.state.path),
        "generated_at": iso(time.time()),
    }


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def render_status(d: dict, console: Console) -> None:
    dm = d["daemon"]
    running = f"running (pid {dm['pid']})" if dm["running"] else "not running"
    console.print(styled(("ossyncd", "bold"), f" {running}{' - PAUSED' if dm['paused'] else ''}   "
                         f"state: {d['state_db']}"))
    c = d["credentials"]
    line = styled(f"credentials: {c['source']}")
    if c.get("expires_at"):
        line.append(f", expires {c['expires_at']}")
    if c.get("error"):
        line.append(f"  error: {c['error']}", style="red")
        if c.get("next_attempt_at"):
            line.append(f" (next attempt {c['next_attempt_at']})")
    console.print(line)
    counts = ", ".join(f"{s} {n}" for s, n in d["counts"].items() if n)
    console.print(f"files: {counts or 'none'}")
    if d["in_flight"]:
        t = Table("uploading", "key", "progress", box=None)
        for f in d["in_flight"]:
            pct = 100 * f["bytes_done"] / f["bytes_total"] if f["bytes_total"] else 100
            t.add_row(f["path"], f["key"], f"{_mib(f['bytes_done'])} / {_mib(f['bytes_total'])} ({pct:.0f}%)")
        console.print(t)
    if d["failures"]:
        t = Table("recent problems", "state", "when", "reason", box=None)
        for f in d["failures"]:
            t.add_row(f["path"], f["state"], f["when"] or "", f["error"] or "")
        console.print(t)


LIST_COLUMNS = ("path", "state", "size", "key", "url / error")


def render_list(files: list[FileRow], console: Console) -> None:
    """A table on a terminal; piped, whole values as tab-separated lines under a header."""
    rows = [(f.path, f.state, str(f.size), f.key, f.url or f.error or "") for f in files]
    if not console.is_terminal:
        tsv([LIST_COLUMNS] + rows, console)
        return
    t = Table(*LIST_COLUMNS, box=None)
    for row in rows:
        t.add_row(*row)
    console.print(t)
