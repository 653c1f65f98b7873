"""The chaos suite's figures: `record(scenario, **figures)` appends one JSON line per scenario to
`$OSSYNCD_CHAOS_REPORT` (tests/chaos/conftest.py points it into the pytest tmp dir when unset);
`table()` renders them for the terminal summary of `make chaos`. With the variable unset (the
short versions in `make test`) `record` writes nothing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "OSSYNCD_CHAOS_REPORT"
COLUMNS = ("scenario", "kills", "faults", "rotations", "files", "bytes", "resent_bytes",
           "lost", "false_done", "orphans", "integrity")
MIB_COLUMNS = ("bytes", "resent_bytes")   # shown in MiB


def path() -> Path | None:
    return Path(os.environ[ENV]) if os.environ.get(ENV) else None


def record(scenario: str, **figures) -> dict:
    row = {"scenario": scenario, "at": round(time.time(), 1), **figures}
    p = path()
    if p is not None:
        with open(p, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def rows(p: Path | None = None) -> list[dict]:
    p = p or path()
    if p is None or not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def table(items: list[dict]) -> str:
    """A Markdown table (it goes into README "Reliability" as is), with a total row."""
    if not items:
        return ""
    total = {"scenario": "**total**"}
    for c in COLUMNS[1:]:
        vals = [r.get(c) for r in items if isinstance(r.get(c), (int, float))]
        if vals:
            total[c] = sum(vals)
    total["integrity"] = "ok" if all(r.get("integrity") == "ok" for r in items) else "NOT ok"
    heads = [f"{c} (MiB)" if c in MIB_COLUMNS else c for c in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(COLUMNS)]
    for r in items + [total]:
        cells = [_cell(r.get(c) / 1048576 if c in MIB_COLUMNS and r.get(c) is not None else r.get(c)) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


if __name__ == "__main__":   # make chaos: the table of every scenario of the run
    import sys

    items = rows(Path(sys.argv[1]))
    print("\n== chaos summary ==\n" + (table(items) or "(no scenario recorded)"))
