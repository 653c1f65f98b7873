"""prune_empty_dirs: remove the folders an after-upload delete or move left empty
(docs/architecture.md §3, "After upload").

Only folders the action emptied are candidates (never one an operator made and left
empty), only below the watch root (never the root, never `move_to`), and only once empty
for `prune_min_age` seconds, judged by the folder's mtime (any entry added or removed
since resets it). Removal is `os.rmdir`, which refuses a folder that is not empty, so a
file arriving at the last moment is never lost. A removed folder makes its parent a
candidate. Candidates live in memory: after a restart the next action in a folder makes
it one again.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Mapping

import structlog

from ossyncd.config import WatchConfig

log = structlog.get_logger(__name__)


class Pruner:
    def __init__(self) -> None:
        self.candidates: dict[str, str] = {}   # folder -> its watch root

    def emptied(self, w: WatchConfig, path: str) -> None:
        """The action took `path` out of its folder."""
        root = os.path.normpath(os.fspath(w.path))
        folder = os.path.dirname(os.path.normpath(path))
        if folder.startswith(root.rstrip("/") + "/"):
            self.candidates[folder] = root

    def tick(self, watches: Mapping[str, WatchConfig], now: float) -> list[str]:
        """Remove the candidates that have been empty long enough; returns them."""
        removed = []
        for folder, root in list(self.candidates.items()):
            w = watches.get(root)
            if w is None or not w.prune_empty_dirs:
                del self.candidates[folder]
                continue
            try:
                st = os.lstat(folder)
                if not stat.S_ISDIR(st.st_mode):   # gone, or replaced by a symlink: never followed
                    raise FileNotFoundError(folder)
                with os.scandir(folder) as it:
                    empty = next(it, None) is None
            except OSError:
                del self.candidates[folder]
                continue
            if not empty:
                del self.candidates[folder]   # the next action in it makes it a candidate again
                continue
            if now - st.st_mtime < w.prune_min_age:
                continue
            del self.candidates[folder]
            try:
                os.rmdir(folder)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    log.warning("empty folder not removed", path=folder, error=e.strerror)
                continue
            log.info("empty folder removed", path=folder)
            removed.append(folder)
            self.emptied(w, folder)
        return removed
