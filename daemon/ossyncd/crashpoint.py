"""Crash points: a test seam that kills the daemon at a named moment (docs/architecture.md §11).

`OSSYNCD_CRASHPOINT=name` (or `name:nth`, the nth time that point is reached, counting from 1)
makes `hit(name)` SIGKILL the process there, as `kill -9` would, after one JSON line on stderr
saying which point fired. Unset, `hit` costs one string comparison. The chaos suite
(tests/chaos/) uses it to hit the dangerous moments on purpose rather than by chance.
"""

from __future__ import annotations

import itertools
import os
import signal

_SPEC = os.environ.get("OSSYNCD_CRASHPOINT") or ""
_NAME, _, _NTH = _SPEC.partition(":")
_AT = int(_NTH) if _NTH.isdigit() and int(_NTH) > 0 else 1
_hits = itertools.count(1)   # next() is atomic under the GIL: parts' threads may hit the same point

NAMES = ("in_commit", "after_put", "after_complete", "after_initiate", "after_upload_action", "in_rescan")


def hit(name: str) -> None:
    if name != _NAME:
        return
    if next(_hits) == _AT:
        os.write(2, b'{"event": "crashpoint", "name": "%s", "nth": %d}\n' % (name.encode(), _AT))
        os.kill(os.getpid(), signal.SIGKILL)
