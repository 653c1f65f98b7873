"""Walk a watch root and classify what is there, without opening any file.

``scan_root`` yields one ``Entry`` per candidate; ``stat_entry`` classifies a
single path (from a watcher event, or a restat) by the same rules. Excluded
globs and the move_to subtree are ignored silently (never yielded); so are temp
names, unless ``with_temp``: then they come as kind "temp", so the scheduler can
show a real file that a temp rule matches once it has settled.
"""

from __future__ import annotations

import errno
import os
import stat as st_
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from .model import INT64_MAX, INT64_MIN, Identity, clamp_ns
from .objectspec import FileFacts, normalize, object_key_for
from .paths import (
    MAX_KEY_BYTES,
    check_key,
    glob_matcher,
    ignored_subtree,
    is_excluded,
    is_temp_name,
    object_key,
    relpath_of,
    temp_name_test,
    temp_rule,
    temp_rule_label,
)

_MIN, _MAX = INT64_MIN, INT64_MAX
_SPECIAL = (
    (st_.S_ISFIFO, "named pipe (FIFO)"),
    (st_.S_ISSOCK, "UNIX socket"),
    (st_.S_ISCHR, "character device"),
    (st_.S_ISBLK, "block device"),
)


class Entry(NamedTuple):
    """One candidate of a walk. A NamedTuple, not a frozen dataclass: a walk builds one per
    file, and a frozen __init__ sets each field through object.__setattr__ (several times
    slower; docs/architecture.md §3)."""
    path: str
    relpath: str
    kind: str  # "file" | "skipped" | "temp"
    key: str = ""
    size: int = 0        # size .. ctime_ns in a row, as in state.KnownRow: the rescan compares slices
    mtime_ns: int = 0
    inode: int = 0
    ctime_ns: int | None = None
    dev: int = 0
    reason: str = ""

    @property
    def identity(self) -> Identity:
        """Which version of the file this is (see model.Identity)."""
        return Identity(self.size, self.mtime_ns, self.inode, self.ctime_ns)


def _special_reason(mode: int) -> str:
    for test, what in _SPECIAL:
        if test(mode):
            return f"{what} - not a regular file; not uploaded"
    return "not a regular file; not uploaded"


class _Rules:
    """Per-scan constants, computed once (the loop runs per file)."""

    def __init__(self, watch):
        self.watch = watch
        self.root = os.path.normpath(os.fspath(watch.path))
        self.key_prefix = object_key(watch.prefix or "", "")  # relpaths are POSIX already
        self.match = glob_matcher(tuple(watch.exclude or ()))
        self.recursive = bool(watch.recursive)
        self.follow = bool(getattr(watch, "follow_symlinks", False))
        self.skip_dir = ignored_subtree(watch)
        self.temp_rules = getattr(watch, "temp_names", None)
        self.temp_match = temp_name_test(self.temp_rules)
        spec = getattr(watch, "object", None)
        # the default key template is the plain join, so a folder's key part is built once
        self.plain_keys = spec is None or spec.key_template == "{prefix}{relpath}"
        self.nfc = spec is not None and spec.unicode_normalize == "NFC"
        self._root_real: str | None = None

    @property
    def root_real(self) -> str:
        if self._root_real is None:
            self._root_real = os.path.realpath(self.root)
        return self._root_real

    def excluded(self, name: str, relpath: str) -> bool:
        m = self.match
        return m is not None and (m(name) is not None or m(relpath) is not None)

    def file(self, path: str, relpath: str, s: os.stat_result) -> Entry:
        spec = getattr(self.watch, "object", None)
        key = self.key_prefix + relpath if spec is None else object_key_for(
            spec, self.watch.prefix or "", FileFacts(relpath, s.st_size, s.st_mtime_ns))
        bad = check_key(key)
        if bad is not None:
            return Entry(path, relpath, "skipped", key, reason=bad)
        # Identity.of's fields, without building it: this runs once per file of every rescan
        return Entry(path, relpath, "file", key, s.st_size, clamp_ns(s.st_mtime_ns), s.st_ino, clamp_ns(s.st_ctime_ns),
                     s.st_dev)

    def dir_keys(self, drel: str) -> tuple[str, int]:
        """(the key part of folder `drel`, the UTF-8 bytes left for a name) when a plain name
        in it can take `fast_file`; room -1 when not (every file takes `file`)."""
        if not self.plain_keys:
            return "", -1
        dkey = self.key_prefix + (normalize(drel, "NFC") if self.nfc else drel)
        if check_key(dkey + "x") is not None:   # the folder part fails; a probe name stands for the file's
            return dkey, -1
        return dkey, MAX_KEY_BYTES - len(dkey.encode("utf-8"))

    def temp(self, path: str, relpath: str, s: os.stat_result, rule: str) -> Entry:
        i = Identity.of(s)
        reason = (f"temp name: {temp_rule_label(rule)} - not uploaded; rename the file, or change "
                  f"temp_names in its [[watch]]")
        return Entry(path, relpath, "temp", self.key_prefix + relpath, i.size, i.mtime_ns, i.inode, i.ctime_ns,
                     s.st_dev, reason)

    def skipped(self, path: str, relpath: str, reason: str) -> Entry:
        return Entry(path, relpath, "skipped", self.key_prefix + relpath, reason=reason)

    def in_skip_dir(self, path: str) -> bool:
        d = self.skip_dir
        return d is not None and (path == d or path.startswith(d + "/"))

    def follow_link(self, path: str, relpath: str) -> tuple[Entry | None, os.stat_result | None]:
        """Resolve a symlink when following. Returns (entry, dir_stat): a dir
        target inside the root comes back as dir_stat for the caller to walk."""
        try:
            target_st = os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return self.skipped(path, relpath, "symlink loop - not followed"), None
            if isinstance(e, FileNotFoundError):
                return self.skipped(path, relpath, "symlink target does not exist (dangling)"), None
            return self.skipped(path, relpath, f"symlink target unreadable: {e.strerror}"), None
        target = os.path.realpath(path)
        try:
            target_rel = relpath_of(self.root_real, target)
        except ValueError:
            return self.skipped(path, relpath, f"symlink points outside the watch root ({target}) - not followed"), None
        # The target must not smuggle in what the rules exclude.
        if (target_rel and is_excluded(target_rel, self.watch.exclude or ())) or (
            self.skip_dir is not None and self.in_skip_dir(self.root + "/" + target_rel)
        ):
            return self.skipped(path, relpath, f"symlink points into an excluded folder ({target}) - not followed"), None
        if st_.S_ISREG(target_st.st_mode):
            if is_temp_name(os.path.basename(target), self.temp_rules):
                return self.skipped(path, relpath, "symlink to a temp file - not followed"), None
            return self.file(path, relpath, target_st), None
        if st_.S_ISDIR(target_st.st_mode):
            return None, target_st
        return self.skipped(path, relpath, "symlink to " + _special_reason(target_st.st_mode)), None


def scan_root(watch, *, with_temp: bool = False) -> Iterator[Entry]:
    """Every candidate under ``watch.path`` (see the module docstring)."""
    return scan_tree(watch, watch.path, with_temp=with_temp)


def scan_tree(watch, top: str | os.PathLike, *, with_temp: bool = False) -> Iterator[Entry]:
    """Like scan_root, but starting at ``top`` (a directory inside the root)."""
    for group in scan_dirs(watch, top, with_temp=with_temp):
        if group.self_entry is not None:
            yield group.self_entry
        yield from group.entries


@dataclass(slots=True)
class DirGroup:
    """One directory of a walk: what it holds, and which of its child folders the walk
    enters later (each comes as its own group). ``self_entry`` is set when the folder
    itself is skipped (unreadable, a symlink not followed as a folder): then it has no
    entries. ``entries`` is empty too for a folder that vanished while the walk ran."""
    path: str
    entries: list[Entry]
    subdirs: set[str]
    self_entry: Entry | None = None


def scan_dirs(watch, top: str | os.PathLike, *, with_temp: bool = False) -> Iterator[DirGroup]:
    """The walk behind scan_tree, one directory at a time, so a caller holds one folder's
    entries at once, never the tree's (the rescan merge, docs/architecture.md §3)."""
    r = _Rules(watch)
    temp_match, match, new = r.temp_match, r.match, tuple.__new__
    top = os.path.normpath(os.fspath(top))
    try:
        top_rel = relpath_of(r.root, top)
        top_st = os.stat(top)
    except (ValueError, OSError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        yield DirGroup(top, [], set(), r.skipped(top, "", f"directory not scannable: {reason}"))
        return
    if top_rel and r.in_skip_dir(top):
        return
    if top_rel and is_excluded(top_rel, watch.exclude or ()):
        return
    visited = {(top_st.st_dev, top_st.st_ino)}
    # Iterative DFS over real dirs: (dir path, its relpath + "/" or "" at the root).
    stack = [(top, top_rel + "/" if top_rel else "")]
    # Followed dir symlinks wait until every real dir is walked, so a file is
    # found under its real name first and the link is the duplicate.
    links: list[tuple[str, str, tuple[int, int]]] = []
    while stack or links:
        if not stack:
            path, relpath, ident = links.pop()
            if ident in visited:
                target = os.path.realpath(path)
                parent = os.path.realpath(os.path.dirname(path))
                if parent == target or parent.startswith(target.rstrip("/") + "/"):
                    reason = f"symlink loop (points to the enclosing folder {target}) - not followed"
                else:
                    reason = f"symlink to a directory already scanned ({target}) - not followed"
                yield DirGroup(path, [], set(), r.skipped(path, relpath, reason))
            else:
                visited.add(ident)
                stack.append((path, relpath + "/"))
            continue
        dpath, drel = stack.pop()
        try:
            it = os.scandir(dpath)
        except FileNotFoundError:
            yield DirGroup(dpath, [], set())   # vanished since it was listed
            continue
        except OSError as e:
            reason = f"directory not readable: {e.strerror}; its files are not uploaded"
            yield DirGroup(dpath, [], set(), r.skipped(dpath, drel.rstrip("/"), reason))
            continue
        dkey, room = r.dir_keys(drel)
        entries: list[Entry] = []
        append = entries.append
        subdirs: set[str] = set()
        with it:
            for de in it:
                name = de.name
                relpath = drel + name
                try:
                    if de.is_file(follow_symlinks=False):   # the common case first
                        if match is not None and r.excluded(name, relpath):
                            continue
                        if temp_match is not None and temp_match(name) is not None:
                            if with_temp:
                                rule = temp_rule(name, r.temp_rules)
                                append(r.temp(de.path, relpath, de.stat(follow_symlinks=False), rule or ""))
                            continue
                        s = de.stat(follow_symlinks=False)
                        # a plain name whose key is the folder's key part plus the name, and which
                        # check_key provably accepts (see dir_keys): the Entry is built inline
                        if len(name) <= room and name.isascii() and name.isprintable() and (dkey or name[0] != "\\"):
                            m, c = s.st_mtime_ns, s.st_ctime_ns
                            if _MIN <= m <= _MAX and _MIN <= c <= _MAX:   # else clamp_ns, in file()
                                append(new(Entry, (de.path, relpath, "file", dkey + name, s.st_size, m, s.st_ino, c,
                                                   s.st_dev, "")))
                                continue
                        append(r.file(de.path, relpath, s))
                        continue
                    path = de.path
                    if de.is_dir(follow_symlinks=False):
                        if not r.recursive or (match is not None and r.excluded(name, relpath)):
                            continue
                        if r.skip_dir is not None and path == r.skip_dir:
                            continue
                        s = de.stat(follow_symlinks=False)
                        ident = (s.st_dev, s.st_ino)
                        if ident not in visited:  # bind-mount loops
                            visited.add(ident)
                            stack.append((path, relpath + "/"))
                            subdirs.add(name)
                        continue
                    if match is not None and r.excluded(name, relpath):
                        continue
                    if temp_match is not None and temp_match(name) is not None:
                        continue   # a temp name that is not a regular file: not even shown
                    if de.is_symlink():
                        if not r.follow:
                            append(r.skipped(path, relpath, "symlink, not followed (follow_symlinks = false)"))
                            continue
                        entry, dir_st = r.follow_link(path, relpath)
                        if entry is not None:
                            append(entry)
                        elif r.recursive and dir_st is not None:
                            links.append((path, relpath, (dir_st.st_dev, dir_st.st_ino)))
                            subdirs.add(name)   # its group comes later: walked, or skipped as a duplicate
                    else:
                        append(r.skipped(path, relpath, _special_reason(de.stat(follow_symlinks=False).st_mode)))
                except FileNotFoundError:
                    continue  # removed while we looked
        yield DirGroup(dpath, entries, subdirs)


_RULES_CACHE: dict[int, tuple[object, _Rules]] = {}   # id(watch) -> (watch, its rules); configs are frozen


def _rules_of(watch) -> _Rules:
    """The rules of a watch, built once per config object (stat_entry runs per watcher event)."""
    hit = _RULES_CACHE.get(id(watch))
    if hit is not None and hit[0] is watch:
        r = hit[1]
        r._root_real = None   # resolved afresh per call, as a new _Rules would: the root link may move
        return r
    if len(_RULES_CACHE) >= 64:   # reloads leave old configs behind
        _RULES_CACHE.clear()
    r = _Rules(watch)
    _RULES_CACHE[id(watch)] = (watch, r)
    return r


def stat_entry(watch, path: str | os.PathLike, *, with_temp: bool = False) -> Entry | None:
    """Classify one path by the scan rules, e.g. for a watcher event or the
    restat before upload. None when it is gone, a directory or ignored."""
    r = _rules_of(watch)
    path = os.path.normpath(os.fspath(path))
    try:
        relpath = relpath_of(r.root, path)
    except ValueError:
        return None
    if not relpath or (not r.recursive and "/" in relpath):
        return None
    name = relpath.rpartition("/")[2]
    rule = temp_rule(name, r.temp_rules)
    if (rule is not None and not with_temp) or is_excluded(relpath, watch.exclude or ()):
        return None
    if r.in_skip_dir(path):
        return None
    try:
        s = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return r.skipped(path, relpath, f"cannot stat: {e.strerror}")
    if rule is not None:
        return r.temp(path, relpath, s, rule) if st_.S_ISREG(s.st_mode) else None
    if st_.S_ISREG(s.st_mode):
        return r.file(path, relpath, s)
    if st_.S_ISDIR(s.st_mode):
        return None
    if st_.S_ISLNK(s.st_mode):
        if not r.follow:
            return r.skipped(path, relpath, "symlink, not followed (follow_symlinks = false)")
        entry, _ = r.follow_link(path, relpath)
        return entry  # a dir target: None, the watcher walks it
    return r.skipped(path, relpath, _special_reason(s.st_mode))
