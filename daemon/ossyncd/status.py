"""Read the state DB (as a concurrent reader) and render `status` and `list` (on the consoles
of ossyncd.output, which never read user data as markup)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Sequence

from ossyncd.output import Console, styled, table
from ossyncd.state import STATES, EventRow, FileRow, State

if TYPE_CHECKING:
    from ossyncd.config import Config


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z") if ts else None


def file_json(f: FileRow) -> dict:
    renamed = {"renamed_from": f.key} if f.stored_key else {}   # overwrite = "rename" chose another key
    return {"path": f.path, "key": f.object_key, **renamed, "state": f.state, "size": f.size, "url": f.url,
            "crc64": str(f.crc64) if f.crc64 is not None else None, "etag": f.etag, "error": f.error,
            "attempts": f.attempts, "uploaded_at": iso(f.uploaded_at), "mode": f.mode,
            "next_attempt_at": iso(f.next_attempt_at), "verification": f.verification,
            "callback": f.callback, "callback_detail": f.callback_detail}


def url_or_error(f: FileRow) -> str:
    """What `list` shows for a file: its URL (and a failed upload callback), or its error."""
    if f.callback == "failed" and f.state == "done":   # stored, but the application server was not told
        return f"{f.url}; callback failed: {f.callback_detail}"
    return f.url or f.error or ""


HEARTBEAT_STALE = 60.0   # seconds; the loop writes its heartbeat every second, even in backoff


def daemon_health(db_path, pid: int | None, now: float) -> dict:
    """The running daemon's state DB error, its retries so far, and the seconds since its last
    heartbeat. Read from '<db>.health', which the daemon rewrites even when the DB cannot be."""
    h = State.read_health(db_path) if pid else {}
    if not h or h.get("pid") != pid or not isinstance(h.get("heartbeat_at"), (int, float)):
        return {"state_error": None, "loop_error": None, "state_retries": 0, "heartbeat_age_s": None,
                "stuck": False}
    age = round(max(0.0, now - h["heartbeat_at"]), 1)
    return {"state_error": h.get("state_error"), "loop_error": h.get("loop_error"),
            "state_retries": h.get("state_retries", 0), "heartbeat_age_s": age, "stuck": age > HEARTBEAT_STALE}


def status_dict(cfg: Config, state: State | None) -> dict:
    pid = State.lock_holder(cfg.state.path)
    counts = {s: 0 for s in STATES}
    in_flight, failures, creds, paused, verification = [], [], {}, False, None
    if state is not None:
        counts.update(state.counts())
        in_flight = [{"path": f.path, "key": f.key, "bytes_done": f.bytes_done, "bytes_total": f.size}
                     for f in state.files("uploading")]
        failures = [{"path": f.path, "state": f.state, "error": f.error, "when": iso(f.updated_at),
                     "next_attempt_at": iso(f.next_attempt_at)} for f in state.recent_failures(10)]
        creds = json.loads(state.get_meta("credentials") or "{}")
        paused = state.get_meta("paused") == "1"
        verification = json.loads(state.get_meta("verification") or "null")
    return {
        "watches": _watches(state) if state is not None and pid is not None else [],
        "daemon": {"running": pid is not None, "pid": pid if pid and pid > 0 else None,
                   "paused": paused and pid is not None, **daemon_health(cfg.state.path, pid, time.time())},
        "counts": counts,
        "in_flight": in_flight,
        "failures": failures,
        "credentials": {"source": cfg.credentials.source, "link": creds.get("link"),
                        "expires_at": creds.get("expires_at"),
                        "error": creds.get("last_error"), "next_attempt_at": creds.get("next_attempt_at")},
        "broker": _broker(cfg, creds, state),
        "verification": verification,   # {"mode": crc64|md5, "detected_at"}; null until the first upload
        "throughput_mib_s": json.loads(state.get_meta("throughput") or "null") if state is not None else None,
        "state_db": str(cfg.state.path),
        "generated_at": iso(time.time()),
    }


def _broker(cfg: Config, creds: dict, state: State | None) -> dict | None:
    """source = "broker": what the broker registered this host for, and the fleet heartbeat."""
    if cfg.credentials.source != "broker":
        return None
    beat = json.loads(state.get_meta("heartbeat") or "null") if state is not None else None
    return {"registration": creds.get("registration"), "heartbeat": beat}


def _render_broker(b: dict | None, console: Console) -> None:
    if not b:
        return
    reg = b.get("registration")
    if reg:
        prefixes = ", ".join(reg.get("prefixes") or ()) or "(the broker did not say)"
        console.print(styled(f"broker registration: bucket {reg.get('bucket') or '?'}, prefixes {prefixes}"))
    beat = b.get("heartbeat")
    if beat:
        line = styled(f"broker heartbeat: {beat.get('url')}, last sent {beat.get('last_sent_at') or 'never'}")
        if beat.get("error"):
            line.append(f"  error: {beat['error']} since {beat.get('error_since')}", style="red")
        console.print(line)


def _watches(state: State) -> list[dict]:
    """Each watch root as the running daemon last saw it: ok, missing or failed (re-arm)."""
    out = []
    for w in json.loads(state.get_meta("watches") or "[]"):
        out.append({**w, "since": iso(w.get("since"))})
    return out


def _render_watches(watches: list[dict], console: Console) -> None:
    for w in watches:
        if w["state"] == "ok":
            polling = f" (events by polling: {w['why']})" if w.get("events") == "polling" and w.get("why") else ""
            console.print(styled(f"watch[{w['index']}] {w['path']}: ok", (polling, "yellow")))
            continue
        why = f": {w['error']}" if w.get("error") else ""
        console.print(styled((f"watch[{w['index']}] {w['path']}: {w['state'].upper()} since {w['since']}{why}", "red"),
                             " - no events from it; recreate the folder and it is watched again"))


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def render_status(d: dict, console: Console) -> None:
    dm = d["daemon"]
    running = f"running (pid {dm['pid']})" if dm["running"] else "not running"
    console.print(styled(("ossyncd", "bold"), f" {running}{' - PAUSED' if dm['paused'] else ''}   "
                         f"state: {d['state_db']}"))
    if dm.get("state_error"):
        console.print(styled(("state error:", "red"), f" {dm['state_error']} (uploads wait)"))
    if dm.get("loop_error"):
        console.print(styled(("scheduler error:", "red"), f" {dm['loop_error']} (uploads wait; see the log)"))
    if dm.get("stuck"):
        console.print(styled((f"the daemon's loop has not ticked for {dm['heartbeat_age_s']:.0f} s", "red"),
                             "; see its log (journalctl -u ossyncd)"))
    c = d["credentials"]
    line = styled(f"credentials: {c.get('link') or c['source']}")
    if c.get("expires_at"):
        line.append(f", expires {c['expires_at']}")
    if c.get("error"):
        line.append(f"  error: {c['error']}", style="red")
        if c.get("next_attempt_at"):
            line.append(f" (next attempt {c['next_attempt_at']})")
    console.print(line)
    _render_broker(d.get("broker"), console)
    v = d.get("verification")
    if v:
        how = ("CRC64 (x-oss-hash-crc64ecma)" if v["mode"] == "crc64"
               else "MD5 (the server returns no x-oss-hash-crc64ecma; Content-MD5 and ETag are checked)")
        console.print(f"verification: {how}, detected {v['detected_at']}")
    _render_watches(d.get("watches", []), console)
    counts = ", ".join(f"{s} {n}" for s, n in d["counts"].items() if n)
    console.print(f"files: {counts or 'none'}")
    if d["in_flight"] or d["failures"]:
        _render_tables(d, console)


def _render_tables(d: dict, console: Console) -> None:
    # only here: a status with nothing in flight or failed prints without rich
    from rich.table import Table
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
    rows = [(f.path, f.state, str(f.size), f.object_key, url_or_error(f)) for f in files]
    _render_rows(LIST_COLUMNS, rows, console)


def _render_rows(columns: tuple[str, ...], rows: Sequence[tuple[str, ...]], console: Console) -> None:
    table(columns, rows, console)


EVENT_COLUMNS = ("id", "event", "hook", "kind", "state", "attempts", "path", "error")


def event_json(e: EventRow) -> dict:
    return {"id": e.id, "event_id": e.event_id, "hook": e.hook, "kind": e.kind, "state": e.state,
            "attempts": e.attempts, "path": e.path, "error": e.error, "created_at": iso(e.created_at),
            "next_attempt_at": iso(e.next_attempt_at) if e.state == "pending" else None,
            "delivered_at": iso(e.delivered_at), "event": json.loads(e.payload)}


def render_events(rows: list[EventRow], console: Console) -> None:
    """`ossyncd events`: one line per delivery (an event for one hook)."""
    lines = [(str(e.id), e.event_id, e.hook, e.kind, e.state, str(e.attempts), e.path, e.error or "") for e in rows]
    _render_rows(EVENT_COLUMNS, lines, console)
