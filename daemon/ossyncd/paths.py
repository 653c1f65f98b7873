"""Pure rules about file names and object keys (no filesystem access).

Paths are ``str`` as produced by ``os.fsdecode``: a name that is not UTF-8
keeps its raw bytes as lone surrogates (surrogateescape), so it round-trips
to the filesystem while ``check_key`` can still refuse it as a key.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from typing import Iterable

MAX_KEY_BYTES = 1023

# Writers' temp names; their final rename is what counts (docs/architecture.md §3). The name
# of the rule is what `list` shows for a file it skipped; [[watch]] temp_names picks rules.
TEMP_RULES = {
    "rsync": r"\..+\.[A-Za-z0-9]{6}",             # rsync: .name.XXXXXX
    "partial": r".*\.(?i:part|tmp|crdownload)",    # browsers, curl, many exporters
    "office-owner": r"~\$.*",                     # MS Office owner files
    "vim-swap": r"\..*\.sw[a-px]",                 # vim swap files (.swp .swo ... .swx probe)
    "backup": r".*~",                             # emacs/vim backups
    "vim-probe": r"4913",                         # vim's write-permission probe
    "emacs-lock": r"\.\#.*",                       # emacs lock files
    "libreoffice-lock": r"\.~lock\..*\#",           # LibreOffice lock files
}
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def temp_rule_label(rule: str) -> str:
    """How a rule is named in a skip reason: built-in rules bare, globs quoted."""
    return rule if rule in TEMP_RULES else f'"{rule}"'


@functools.lru_cache(maxsize=64)
def _temp_matcher(rules: tuple[str, ...] | None):
    """One regex for all rules; the matching group's index says which rule it was."""
    names = tuple(TEMP_RULES) if rules is None else rules
    if not names:
        return None, ()
    alts = [TEMP_RULES[n] if n in TEMP_RULES else fnmatch.translate(n).removesuffix(r"\Z") for n in names]
    return re.compile("|".join(f"(?P<r{i}>{a})" for i, a in enumerate(alts)), re.DOTALL).fullmatch, names


def temp_rule(name: str, rules: Iterable[str] | None = None) -> str | None:
    """The temp-name rule a basename matches (built-in name or glob), else None.
    ``rules`` None: every built-in rule; otherwise exactly those (watch.temp_names)."""
    match, names = _temp_matcher(None if rules is None else tuple(rules))
    if match is None:
        return None
    m = match(name)
    return names[int(m.lastgroup[1:])] if m is not None else None


def temp_name_test(rules: Iterable[str] | None = None):
    """is_temp_name's compiled test, for a loop over many names: a function of a basename that
    returns a match (truthy) for a temp name and None otherwise; None itself when no rule is set."""
    return _temp_matcher(None if rules is None else tuple(rules))[0]


def is_temp_name(name: str, rules: Iterable[str] | None = None) -> bool:
    """True for a basename that a common writer uses before its final rename."""
    return temp_rule(name, rules) is not None


@functools.lru_cache(maxsize=64)
def glob_matcher(globs: tuple[str, ...]):
    """One compiled regex for all globs (scanning calls this per file)."""
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs)).match


def matches_globs(relpath: str, globs: Iterable[str]) -> bool:
    """fnmatch (case-sensitive) against the basename or the whole relpath."""
    match = glob_matcher(tuple(globs))
    if match is None:
        return False
    return match(relpath.rpartition("/")[2]) is not None or match(relpath) is not None


def is_excluded(relpath: str, globs: Iterable[str]) -> bool:
    """True when the relpath, or any directory above it, matches a glob.

    Ancestors count so the watcher agrees with the scanner, which prunes an
    excluded directory (``.*`` excludes everything below ``.git/``).
    """
    globs = tuple(globs)
    if not globs:
        return False
    relpath = _posix(relpath)
    parts = relpath.split("/")
    return any(matches_globs("/".join(parts[: i + 1]), globs) for i in range(len(parts)))


def _posix(relpath: str) -> str:
    if os.sep != "/":
        relpath = relpath.replace(os.sep, "/")
    while relpath.startswith("./"):
        relpath = relpath[2:]
    return relpath


def object_key(prefix: str, relpath: str) -> str:
    """The object key for a file: prefix joined to its POSIX relpath.

    A non-empty prefix is a folder, so a missing trailing ``/`` is added.
    """
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return prefix + _posix(relpath)


def check_key(key: str) -> str | None:
    """None if OSS accepts ``key``; else a reason a person can act on."""
    if not key:
        return "object key is empty"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raw = os.fsencode(key)
        return f"name is not valid UTF-8 ({raw!r}); OSS keys must be UTF-8 - rename the file"
    bad = _CONTROL_RE.search(key)
    if bad is not None:
        ch = bad.group()
        what = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab"}.get(
            ch, f"control character U+{ord(ch):04X}"
        )
        return f"name contains {what}; not allowed in an object key - rename the file"
    if size > MAX_KEY_BYTES:
        return f"object key is {size} bytes in UTF-8; OSS allows at most {MAX_KEY_BYTES} - shorten the path or prefix"
    if key[0] in "/\\":
        return f"object key starts with {key[0]!r}; OSS keys must not - fix the prefix"
    return None


def relpath_of(root: str | os.PathLike, path: str | os.PathLike) -> str:
    """POSIX path of ``path`` relative to ``root`` (no filesystem access).

    Raises ValueError if ``path`` is not below ``root``; returns "" for root.
    """
    root_s = os.fspath(root).rstrip("/")
    path_s = os.fspath(path)
    if path_s.rstrip("/") == root_s:
        return ""
    if not path_s.startswith(root_s + "/"):
        raise ValueError(f"{path_s!r} is not inside {root_s or '/'!r}")
    return _posix(path_s[len(root_s) + 1 :])


def ignored_subtree(watch) -> str | None:
    """The move_to folder when it lies inside the watch root, else None."""
    if getattr(watch, "after_upload", "keep") != "move" or not getattr(watch, "move_to", None):
        return None
    root = os.path.normpath(os.fspath(watch.path))
    move_to = os.path.normpath(os.fspath(watch.move_to))
    # move_to == root is a config error (config.py rejects it), not "ignore all".
    return move_to if move_to.startswith(root.rstrip("/") + "/") else None


def watch_ignores(watch, path: str | os.PathLike) -> bool:
    """True for paths in the move_to subtree inside the root: moved-away
    (already uploaded) files must not be picked up again."""
    sub = ignored_subtree(watch)
    if sub is None:
        return False
    path_s = os.path.normpath(os.fspath(path))
    return path_s == sub or path_s.startswith(sub.rstrip("/") + "/")
