"""The end-of-scenario checks of the chaos suite (issue 15), shared by every scenario.

`check(emulator, config, state_db, expected, settled_never)` asserts, once a scenario has
converged (the daemon may still run, or be stopped):

- every surviving file is byte-equal in the bucket, read back with the root key;
- no object exists for a file that never settled (`settled_never`: keys);
- no multipart upload is open (ListMultipartUploads with the root key; waits up to
  `uploads_timeout` for the orphan sweep);
- `PRAGMA integrity_check` of the state DB is `ok`;
- `status --json` and `list --json` agree with the bucket: every `done` row's object exists
  with the row's CRC-64 (no false `done`), every expected key is `done`, nothing `failed`,
  nothing still queued or uploading;
- bytes re-sent (PutObject + UploadPart body bytes received beyond the expected files' sizes and
  `legit_extra`) stay within `resend_bound`, when given.

It returns the figures for `report.record`: files, bytes, resent_bytes, objects, lost,
false_done, orphans, integrity.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Iterable, Mapping

import oss2

from tests.helpers import ossyncd, root_bucket, wait_until

UNSETTLED_STATES = ("settling", "queued", "uploading", "retry_wait")
BODY_OPS = ("PutObject", "UploadPart")


def integrity(state_db: Path) -> str:
    """`PRAGMA integrity_check` on the state DB, opened read-only."""
    db = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=30)
    try:
        return ";".join(r[0] for r in db.execute("PRAGMA integrity_check").fetchall())
    finally:
        db.close()


def open_uploads(emulator) -> list[tuple[str, str]]:
    """Every open multipart upload in the bucket, as the root key lists it."""
    return [(u.key, u.upload_id) for u in oss2.MultipartUploadIterator(root_bucket(emulator))]


def body_bytes(emulator) -> int:
    """Body bytes the emulator received for PutObject and UploadPart so far."""
    by_op = emulator.stats()["bytes_received_by_op"]
    return sum(by_op.get(op, 0) for op in BODY_OPS)


def _cli_json(*args) -> object:
    r = ossyncd(*args, "--json")
    assert r.returncode == 0, f"ossyncd {' '.join(map(str, args))}: {r.stderr}"
    return json.loads(r.stdout)


def check(emulator, config: Path, state_db: Path, expected: Mapping[str, bytes | Path],
          settled_never: Iterable[str] = (), *, resend_bound: int | None = None, legit_extra: int = 0,
          uploads_timeout: float = 30.0, allow_failed: bool = False) -> dict:
    """Assert the invariants (module docstring); return the figures. `expected` maps each key
    that must be in the bucket to its bytes (or the Path holding them now)."""
    bucket = root_bucket(emulator)
    want = {k: (v.read_bytes() if isinstance(v, Path) else v) for k, v in expected.items()}

    lost = [k for k, data in want.items() if _get(bucket, k) != data]
    assert not lost, f"{len(lost)} file(s) lost or not byte-equal in the bucket: {lost[:10]}"

    never = sorted(settled_never)
    present = [k for k in never if bucket.object_exists(k)]
    assert not present, f"object(s) for files that never settled: {present[:10]}"

    orphans: list = []

    def no_uploads():
        orphans[:] = open_uploads(emulator)
        return not orphans
    try:
        wait_until(no_uploads, uploads_timeout, interval=0.5, what="no open multipart upload")
    except AssertionError:
        raise AssertionError(f"{len(orphans)} multipart upload(s) left open: {orphans[:10]}") from None

    ok = integrity(state_db)
    assert ok == "ok", f"state DB {state_db} integrity_check: {ok}"

    rows = _cli_json("list", "-c", config)
    status = _cli_json("status", "-c", config)
    counts = status["counts"]
    done_rows = [r for r in rows if r["state"] == "done"]
    assert counts["done"] == len(done_rows), (counts, len(done_rows))
    false_done = []
    for r in done_rows:
        try:
            crc = bucket.head_object(r["key"]).headers.get("x-oss-hash-crc64ecma")
        except oss2.exceptions.NotFound:
            crc = None
        if crc is None or (r["crc64"] is not None and crc != r["crc64"]):
            false_done.append((r["path"], r["key"], r["crc64"], crc))
    assert not false_done, f"`done` row(s) without their object in the bucket: {false_done[:10]}"
    by_key = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append(r["state"])
    not_done = {k: by_key.get(k) for k in want if "done" not in by_key.get(k, [])}
    assert not not_done, f"expected key(s) not `done` in the state DB: {dict(list(not_done.items())[:10])}"
    busy = {s: counts[s] for s in UNSETTLED_STATES if counts.get(s)}
    assert not busy, f"not converged: {busy}; {[r for r in rows if r['state'] in busy][:5]}"
    if not allow_failed:
        assert counts["failed"] == 0, [r for r in rows if r["state"] == "failed"][:5]

    total = sum(len(d) for d in want.values())
    resent = max(0, body_bytes(emulator) - total - legit_extra)
    if resend_bound is not None:
        assert resent <= resend_bound, f"re-sent {resent} bytes, over the bound {resend_bound}"
    return {"files": len(want), "bytes": total, "resent_bytes": resent, "objects": emulator.stats()["objects"],
            "lost": 0, "false_done": 0, "orphans": 0, "integrity": ok}


def check_daemon(d, expected: Mapping[str, bytes | Path], settled_never: Iterable[str] = (), **kw) -> dict:
    """`check` for a tests.helpers.Daemon."""
    return check(d.emu, d.config, d.db, expected, settled_never, **kw)


def _get(bucket, key: str) -> bytes | None:
    try:
        return bucket.get_object(key).read()
    except oss2.exceptions.NoSuchKey:
        return None
