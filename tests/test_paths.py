import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from ossyncd.paths import (
    MAX_KEY_BYTES,
    check_key,
    is_excluded,
    is_temp_name,
    object_key,
    relpath_of,
    temp_rule,
    watch_ignores,
)


@pytest.mark.parametrize(
    "name",
    [
        ".photo.jpg.Xa9bQ2",  # rsync
        ".a.Z12345",
        "movie.mp4.part",
        "movie.mp4.PART",
        "export.tmp",
        "file.crdownload",
        "~$report.docx",
        ".notes.txt.swp",
        ".notes.txt.swx",
        ".notes.txt.swo",
        "notes.txt~",
        "4913",
        ".#notes.txt",
        ".~lock.sheet.ods#",
    ],
)
def test_temp_names(name):
    assert is_temp_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "photo.jpg",
        ".bashrc",  # a dotfile, but not rsync's pattern (no 6-char suffix)
        ".photo.jpg.Xa9bQ",  # 5 chars: not rsync's
        ".photo.jpg.Xa9bQ2x",  # 7 chars
        "part",
        "a.part.jpg",
        "tmp.txt",
        "4913.txt",
        "report~1.docx",
        "swp",
        "a$b",
    ],
)
def test_not_temp_names(name):
    assert not is_temp_name(name)


def test_exclude_basename_and_relpath():
    globs = ("*.log", ".*", "cache/*", "raw/**/*.cr2")
    assert is_excluded("a.log", globs)
    assert is_excluded("deep/er/a.log", globs)  # basename
    assert is_excluded(".hidden", globs)
    assert is_excluded("sub/.hidden", globs)
    assert is_excluded("cache/x.jpg", globs)  # relpath
    assert is_excluded("raw/2024/a.cr2", globs)
    assert not is_excluded("a.txt", globs)
    assert not is_excluded("sub/a.txt", globs)
    assert not is_excluded("other/cache.jpg", globs)
    assert not is_excluded("a.txt", ())


def test_exclude_applies_to_folders_above():
    # An excluded folder hides its content, as the scanner prunes it.
    assert is_excluded(".git/objects/ab/cdef", (".*",))
    assert is_excluded("cache/deep/x.jpg", ("cache",))
    assert not is_excluded("cachex/deep/x.jpg", ("cache",))


def test_exclude_is_case_sensitive_posix():
    assert not is_excluded("A.LOG", ("*.log",))


def test_object_key_join():
    assert object_key("incoming/", "a/b.txt") == "incoming/a/b.txt"
    assert object_key("incoming", "a/b.txt") == "incoming/a/b.txt"
    assert object_key("", "b.txt") == "b.txt"
    assert object_key("x/", "./b.txt") == "x/b.txt"
    assert object_key("in/", "Фото 2024/été 1.jpg") == "in/Фото 2024/été 1.jpg"


def test_check_key_valid():
    assert check_key("incoming/a b/c d.jpg") is None
    assert check_key("in/写真/été.jpg") is None
    assert check_key("a" * MAX_KEY_BYTES) is None


def test_check_key_length_limit_exact():
    assert check_key("a" * 1023) is None
    reason = check_key("a" * 1024)
    assert reason and "1024 bytes" in reason and "1023" in reason
    # Multi-byte: 341 * 3 = 1023 bytes ok; one more char is over.
    assert check_key("é" * 511 + "a") is None  # 1022 + 1
    assert check_key("写" * 341) is None
    assert "1026 bytes" in check_key("写" * 342)


@pytest.mark.parametrize(
    "key,word",
    [
        ("a\nb.txt", "newline"),
        ("a\rb.txt", "carriage return"),
        ("a\tb.txt", "tab"),
        ("a\x01b.txt", "U+0001"),
        ("a\x7fb.txt", "U+007F"),
    ],
)
def test_check_key_control_chars(key, word):
    reason = check_key(key)
    assert reason and word in reason


def test_check_key_not_utf8():
    name = os.fsdecode(b"bad\xff.txt")
    reason = check_key(object_key("in/", name))
    assert reason and "not valid UTF-8" in reason and "\\xff" in reason
    assert os.fsencode(name) == b"bad\xff.txt"  # the path itself still round-trips


def test_check_key_empty_and_leading_slash():
    assert "empty" in check_key("")
    assert "'/'" in check_key("/abs.txt")
    assert check_key("\\win.txt")


def test_relpath_of():
    assert relpath_of("/srv/drop", "/srv/drop/a/b.txt") == "a/b.txt"
    assert relpath_of(Path("/srv/drop/"), "/srv/drop/b.txt") == "b.txt"
    assert relpath_of("/srv/drop", "/srv/drop") == ""
    assert relpath_of("/", "/x/y") == "x/y"
    with pytest.raises(ValueError):
        relpath_of("/srv/drop", "/srv/dropbox/a")
    with pytest.raises(ValueError):
        relpath_of("/srv/drop", "/etc/passwd")


def _watch(**kw):
    base = dict(index=0, path=Path("/srv/drop"), prefix="", recursive=True, exclude=(),
                settle_seconds=2.0, after_upload="keep", move_to=None, follow_symlinks=False)
    base.update(kw)
    return SimpleNamespace(**base)


def test_watch_ignores_move_to_inside_root():
    w = _watch(after_upload="move", move_to=Path("/srv/drop/done"))
    assert watch_ignores(w, "/srv/drop/done")
    assert watch_ignores(w, "/srv/drop/done/a/b.txt")
    assert not watch_ignores(w, "/srv/drop/done2/a.txt")
    assert not watch_ignores(w, "/srv/drop/a.txt")


def test_watch_ignores_nothing_otherwise():
    assert not watch_ignores(_watch(after_upload="move", move_to=Path("/srv/done")), "/srv/done/a")
    assert not watch_ignores(_watch(after_upload="keep", move_to=Path("/srv/drop/done")), "/srv/drop/done/a")


@pytest.mark.parametrize("name,rule", [("4913", "vim-probe"), ("report.part", "partial"), ("Q3.TMP", "partial"),
                                       (".env.backup", "rsync"), ("notes~", "backup"),
                                       ("x.crdownload", "partial"), ("~$a.docx", "office-owner"),
                                       (".a.txt.swp", "vim-swap"), (".#a.txt", "emacs-lock"),
                                       (".~lock.a.ods#", "libreoffice-lock"), ("photo.jpg", None)])
def test_temp_rule_names_the_rule(name, rule):
    assert temp_rule(name) == rule


def test_temp_rules_chosen_per_watch():
    rules = ("*.partial", "vim-probe")
    assert temp_rule("scan.partial", rules) == "*.partial"
    assert temp_rule("4913", rules) == "vim-probe"
    assert temp_rule("report.part", rules) is None
    assert temp_rule("4913", ()) is None                     # [] turns every rule off
    assert is_temp_name("4913") and not is_temp_name("4913", ())
