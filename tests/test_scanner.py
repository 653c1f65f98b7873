import json
import os
import socket
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ossyncd.model import Identity
from ossyncd.scanner import scan_root, scan_tree, stat_entry

pytestmark = pytest.mark.timeout(60)


def make_watch(root, **kw):
    base = dict(index=0, path=Path(root), prefix="in/", recursive=True, exclude=(),
                settle_seconds=2.0, after_upload="keep", move_to=None, follow_symlinks=False)
    base.update(kw)
    return SimpleNamespace(**base)


def by_rel(watch):
    out = {}
    for e in scan_root(watch):
        assert e.relpath not in out, f"{e.relpath} yielded twice"
        out[e.relpath] = e
    return out


def write(p, data=b"x"):
    p = Path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_nested_dirs(tmp_path):
    write(tmp_path / "a.txt", b"abc")
    write(tmp_path / "d1/b.txt")
    write(tmp_path / "d1/d2/d3/c.bin", b"12345")
    (tmp_path / "empty").mkdir()
    got = by_rel(make_watch(tmp_path))
    assert set(got) == {"a.txt", "d1/b.txt", "d1/d2/d3/c.bin"}
    c = got["d1/d2/d3/c.bin"]
    st = os.lstat(tmp_path / "d1/d2/d3/c.bin")
    assert (c.kind, c.key, c.size, c.mtime_ns, c.inode, c.dev) == (
        "file", "in/d1/d2/d3/c.bin", 5, st.st_mtime_ns, st.st_ino, st.st_dev)
    assert c.path == str(tmp_path / "d1/d2/d3/c.bin")
    assert c.identity == Identity(5, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def test_not_recursive(tmp_path):
    write(tmp_path / "a.txt")
    write(tmp_path / "sub/b.txt")
    assert set(by_rel(make_watch(tmp_path, recursive=False))) == {"a.txt"}
    assert stat_entry(make_watch(tmp_path, recursive=False), tmp_path / "sub/b.txt") is None


def test_deep_tree_no_recursion_limit(tmp_path):
    # Deeper than Python's recursion limit would allow a recursive walk.
    depth = 1200
    cur = os.open(tmp_path, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=cur)
            nxt = os.open("d", os.O_RDONLY, dir_fd=cur)
            os.close(cur)
            cur = nxt
        fd = os.open("leaf.txt", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=cur)
        os.close(fd)
    finally:
        os.close(cur)
    try:
        got = by_rel(make_watch(tmp_path, prefix=""))
        (leaf,) = got.values()
        assert leaf.relpath == "d/" * depth + "leaf.txt"
        assert leaf.kind == "skipped" and "1023" in leaf.reason  # the key is too long, found anyway
    finally:
        # shutil.rmtree (and pytest's cleanup) recurse and would hit the limit.
        subprocess.run(["rm", "-rf", str(tmp_path / "d")], check=True)


def test_fifo_socket_devices_are_skipped_never_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe")  # opening this for reading would block the test
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "sock"))
    try:
        mknod_ok = True
        try:
            os.mknod(tmp_path / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
            os.mknod(tmp_path / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
        except PermissionError:
            mknod_ok = False
        w = make_watch(tmp_path)
        got = by_rel(w)
        assert got["pipe"].kind == "skipped"
        assert got["pipe"].reason == "named pipe (FIFO) - not a regular file; not uploaded"
        assert got["sock"].kind == "skipped" and got["sock"].reason.startswith("UNIX socket")
        assert stat_entry(w, tmp_path / "pipe").reason == got["pipe"].reason
        if not mknod_ok:
            pytest.skip("mknod not permitted here: device-node cases not exercised")
        assert got["chr"].reason.startswith("character device - not a regular file")
        assert got["blk"].reason.startswith("block device - not a regular file")
        assert stat_entry(w, tmp_path / "chr").kind == "skipped"
    finally:
        s.close()


def test_symlinks_not_followed_by_default(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write(outside / "secret.txt")
    write(root / "real.txt")
    (root / "out.txt").symlink_to(outside / "secret.txt")
    (root / "in.txt").symlink_to("real.txt")
    (root / "dirlink").symlink_to(outside)
    w = make_watch(root)
    got = by_rel(w)
    for name in ("out.txt", "in.txt", "dirlink"):
        assert got[name].kind == "skipped"
        assert got[name].reason == "symlink, not followed (follow_symlinks = false)"
    assert got["real.txt"].kind == "file"
    assert stat_entry(w, root / "out.txt").reason == got["out.txt"].reason


def test_symlinks_followed_inside_root_only(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write(outside / "secret.txt")
    write(outside / "sub/s2.txt")
    write(root / "real.txt", b"12345")
    (root / "out.txt").symlink_to(outside / "secret.txt")
    (root / "outdir").symlink_to(outside)
    (root / "in.txt").symlink_to("real.txt")
    (root / "sneaky.txt").symlink_to("../outside/secret.txt")  # relative, escapes
    (root / "dangling").symlink_to("nope")
    w = make_watch(root, follow_symlinks=True)
    got = by_rel(w)
    assert set(got) == {"real.txt", "out.txt", "outdir", "in.txt", "sneaky.txt", "dangling"}
    for name in ("out.txt", "outdir", "sneaky.txt"):
        assert got[name].kind == "skipped"
        assert got[name].reason.startswith("symlink points outside the watch root (")
        assert str(outside.resolve()) in got[name].reason
    assert "dangling" in got["dangling"].reason
    link = got["in.txt"]  # inside the root: followed, with the target's stat
    assert (link.kind, link.size, link.key) == ("file", 5, "in/in.txt")
    assert link.inode == os.stat(root / "real.txt").st_ino
    assert stat_entry(w, root / "in.txt") == link
    assert stat_entry(w, root / "out.txt").kind == "skipped"


def test_symlink_loops(tmp_path):
    write(tmp_path / "sub/f.txt")
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    os.symlink("..", tmp_path / "sub/up")  # dir link to its parent (the root)
    os.symlink(".", tmp_path / "sub/self")
    w = make_watch(tmp_path, follow_symlinks=True)
    got = by_rel(w)
    assert set(got) == {"sub/f.txt", "a", "b", "sub/up", "sub/self"}
    assert got["a"].reason == "symlink loop - not followed"
    assert got["b"].reason == "symlink loop - not followed"
    assert got["sub/up"].reason.startswith("symlink loop (points to the enclosing folder")
    assert got["sub/self"].reason.startswith("symlink loop (points to the enclosing folder")
    assert stat_entry(w, tmp_path / "a").reason == "symlink loop - not followed"


def test_dir_symlink_inside_root_is_a_duplicate(tmp_path):
    write(tmp_path / "real/f.txt")
    os.symlink("real", tmp_path / "alias")
    got = by_rel(make_watch(tmp_path, follow_symlinks=True))
    # The file is found under its real name; the alias is not walked twice.
    assert got["real/f.txt"].kind == "file"
    assert "alias/f.txt" not in got
    assert got["alias"].reason.startswith("symlink to a directory already scanned")


def test_symlink_into_excluded_or_move_to_not_followed(tmp_path):
    write(tmp_path / ".hidden/f.txt")
    write(tmp_path / "done/old.txt")
    os.symlink(".hidden/f.txt", tmp_path / "h.txt")
    os.symlink("done", tmp_path / "d")
    w = make_watch(tmp_path, follow_symlinks=True, exclude=(".*",), after_upload="move", move_to=tmp_path / "done")
    got = by_rel(w)
    assert set(got) == {"h.txt", "d"}
    assert "excluded folder" in got["h.txt"].reason and "excluded folder" in got["d"].reason


def test_unreadable_dir_as_unprivileged_user(unprivileged):
    # Root reads mode-000 folders, so this runs the scan as nobody.
    top = str(unprivileged.workdir())
    write(Path(top) / "ok/a.txt")
    write(Path(top) / "locked/b.txt")
    write(Path(top) / "zz.txt")
    for d in ("ok", "locked"):
        os.chmod(os.path.join(top, d), 0o755)
    for f in ("ok/a.txt", "locked/b.txt", "zz.txt"):
        os.chmod(os.path.join(top, f), 0o644)
    os.chmod(os.path.join(top, "locked"), 0o000)
    script = (
        "import json; from pathlib import Path; from types import SimpleNamespace as NS\n"
        "from ossyncd.scanner import scan_root\n"
        f"w = NS(index=0, path=Path({top!r}), prefix='', recursive=True, exclude=(), settle_seconds=2,"
        " after_upload='keep', move_to=None, follow_symlinks=False)\n"
        "print(json.dumps({e.relpath: [e.kind, e.reason] for e in scan_root(w)}))\n"
    )
    out = subprocess.run(unprivileged.cmd("-c", script), cwd=top, env=unprivileged.env(), capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["ok/a.txt"] == ["file", ""]
    assert got["zz.txt"] == ["file", ""]  # the scan carried on
    kind, reason = got["locked"]
    assert kind == "skipped" and reason.startswith("directory not readable: Permission denied")


def test_unreadable_file_is_still_a_candidate(tmp_path):
    # The scanner never opens files; the upload fails it with a permission reason.
    p = write(tmp_path / "secret.bin", b"abc")
    p.chmod(0)
    assert by_rel(make_watch(tmp_path))["secret.bin"].kind == "file"


def test_bad_names(tmp_path):
    bdir = os.fsencode(tmp_path)
    fd = os.open(bdir + b"/bad\xff.txt", os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    write(tmp_path / "new\nline.txt")
    write(tmp_path / "ctrl\x01.txt")
    write(tmp_path / "ok é 写真.txt")
    w = make_watch(tmp_path)
    got = by_rel(w)
    bad = got[os.fsdecode(b"bad\xff.txt")]
    assert bad.kind == "skipped" and "not valid UTF-8" in bad.reason
    assert os.fsencode(bad.path) == bdir + b"/bad\xff.txt"  # surrogateescape round-trips
    assert os.path.exists(bad.path)
    assert "newline" in got["new\nline.txt"].reason
    assert "U+0001" in got["ctrl\x01.txt"].reason
    assert got["ok é 写真.txt"].kind == "file" and got["ok é 写真.txt"].key == "in/ok é 写真.txt"
    assert stat_entry(w, bad.path).reason == bad.reason


def test_key_length_limit_via_deep_path(tmp_path):
    # "in/" + 4 * (250 + 1) + name: at and over 1023 bytes.
    d = tmp_path.joinpath(*["a" * 250] * 4)
    d.mkdir(parents=True)
    base = 3 + 4 * 251
    write(d / ("b" * (1023 - base)))  # exactly 1023 bytes
    write(d / ("c" * (1024 - base)))  # 1024
    got = by_rel(make_watch(tmp_path))
    ok = next(e for e in got.values() if e.relpath.endswith("b"))
    over = next(e for e in got.values() if e.relpath.endswith("c"))
    assert ok.kind == "file" and len(ok.key.encode()) == 1023
    assert over.kind == "skipped" and "1024 bytes" in over.reason


def test_temp_excluded_and_move_to_are_silent(tmp_path):
    write(tmp_path / "keep.jpg")
    write(tmp_path / ".keep.jpg.AbC123")  # rsync temp
    write(tmp_path / "dl.part")
    write(tmp_path / "sub/~$doc.docx")
    write(tmp_path / "sub/.doc.txt.swp")
    write(tmp_path / "debug.log")
    write(tmp_path / "sub/deep/trace.log")
    write(tmp_path / "cache/x.jpg")
    write(tmp_path / ".git/config")
    write(tmp_path / "done/uploaded.jpg")
    write(tmp_path / "done/more/u2.jpg")
    write(tmp_path / "sub/ok.txt")
    w = make_watch(tmp_path, exclude=("*.log", "cache/*", ".*"), after_upload="move", move_to=tmp_path / "done")
    assert set(by_rel(w)) == {"keep.jpg", "sub/ok.txt"}
    for rel in (".keep.jpg.AbC123", "dl.part", "debug.log", "cache/x.jpg", ".git/config", "done/uploaded.jpg"):
        assert stat_entry(w, tmp_path / rel) is None, rel
    # Scanning from inside the move_to subtree yields nothing either.
    assert list(scan_tree(w, tmp_path / "done")) == []


def test_move_to_outside_root_is_not_special(tmp_path):
    write(tmp_path / "done/a.jpg")
    w = make_watch(tmp_path, after_upload="move", move_to=tmp_path.parent / "elsewhere")
    assert set(by_rel(w)) == {"done/a.jpg"}


def test_files_vanishing_and_root_missing(tmp_path):
    w = make_watch(tmp_path / "nope")
    (e,) = list(scan_root(w))
    assert e.kind == "skipped" and "No such file" in e.reason
    assert stat_entry(make_watch(tmp_path), tmp_path / "gone.txt") is None
    assert stat_entry(make_watch(tmp_path), "/etc/passwd") is None  # outside the root


@pytest.mark.timeout(120)
def test_scan_100k_files_timing(big_dir, capsys):
    tmp_path = big_dir
    n_dirs, per_dir = 100, 1000
    t0 = time.perf_counter()
    for d in range(n_dirs):
        dp = tmp_path / f"d{d:03}"
        dp.mkdir()
        dfd = os.open(dp, os.O_RDONLY)
        try:
            for i in range(per_dir):
                os.close(os.open(f"img-{i:05}.jpg", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd))
        finally:
            os.close(dfd)
    setup = time.perf_counter() - t0
    w = make_watch(tmp_path, exclude=("*.log", ".*", "cache/*"))
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        n = sum(1 for e in scan_root(w) if e.kind == "file")
        times.append(time.perf_counter() - t0)
        assert n == n_dirs * per_dir
    with capsys.disabled():
        print(f"\n[scan] {n} files in {tmp_path.parent}: {times[0]:.2f}s first, {times[1]:.2f}s second"
              f" (creating them took {setup:.1f}s)")
    assert min(times) < 30  # sanity bound only; expected ~1 s on 2 cores


# ---------------------------------------------------------------- temp names: visible when asked

REAL_FILES_WITH_TEMP_NAMES = {"4913": "vim-probe", "report.part": "partial", "Q3.TMP": "partial",
                              ".env.backup": "rsync", "notes~": "backup", "x.crdownload": "partial"}


def test_temp_names_come_as_temp_entries_with_their_rule_when_asked(tmp_path):
    for name in REAL_FILES_WITH_TEMP_NAMES:
        write(tmp_path / "sub" / name, b"data")
    write(tmp_path / "keep.jpg")
    w = make_watch(tmp_path, exclude=("*.TMP",))
    assert set(by_rel(w)) == {"keep.jpg"}                      # silent by default
    temps = {e.relpath: e for e in scan_root(w, with_temp=True) if e.kind == "temp"}
    assert set(temps) == {f"sub/{n}" for n in REAL_FILES_WITH_TEMP_NAMES if n != "Q3.TMP"}  # excluded wins
    for name, rule in REAL_FILES_WITH_TEMP_NAMES.items():
        if name == "Q3.TMP":
            continue
        e = temps[f"sub/{name}"]
        assert e.reason.startswith(f"temp name: {rule} - not uploaded") and e.size == 4
        assert stat_entry(w, e.path) is None
        assert stat_entry(w, e.path, with_temp=True).reason == e.reason


def test_watch_temp_names_replace_the_built_in_rules(tmp_path):
    write(tmp_path / "report.part")
    write(tmp_path / "scan.partial")
    write(tmp_path / "4913")
    w = make_watch(tmp_path, temp_names=("*.partial", "vim-probe"))
    assert set(by_rel(w)) == {"report.part"}
    (temp,) = [e for e in scan_root(w, with_temp=True) if e.relpath == "scan.partial"]
    assert temp.kind == "temp" and temp.reason.startswith('temp name: "*.partial"')
    assert set(by_rel(make_watch(tmp_path, temp_names=()))) == {"report.part", "scan.partial", "4913"}


@pytest.mark.timeout(120)
def test_settled_temp_names_are_listed_as_skipped_and_a_renamed_temp_leaves_no_row(tmp_path, emulator,
                                                                                    daemon_factory):
    from tests.helpers import object_bytes, ossyncd, random_file, wait_until
    drop, own = tmp_path / "drop", tmp_path / "own"
    drop.mkdir()
    own.mkdir()
    d = daemon_factory([{"path": str(drop), "prefix": "a/", "settle_seconds": 0.3},
                        {"path": str(own), "prefix": "b/", "settle_seconds": 0.3, "temp_names": ["*.partial"]}],
                       daemon={"rescan_interval": 1.0})
    for name in REAL_FILES_WITH_TEMP_NAMES:
        write(drop / name, b"real")
    write(own / "x.partial", b"tmp")
    d.start()
    kept = random_file(own / "report.part", 700, seed=1)       # not a temp name for this watch

    def skipped():
        return {f["path"]: f["error"] for f in d.files("skipped")}
    want = {str(drop / n): rule for n, rule in REAL_FILES_WITH_TEMP_NAMES.items()}
    want[str(own / "x.partial")] = '"*.partial"'
    wait_until(lambda: set(skipped()) == set(want), 30, interval=0.3, what="temp-named files listed as skipped")
    for path, error in skipped().items():
        assert error.startswith(f"temp name: {want[path]} - not uploaded"), (path, error)
    wait_until(lambda: any(f["path"] == str(own / "report.part") and f["state"] == "done" for f in d.files()),
               30, interval=0.3, what="report.part uploaded")
    assert object_bytes(emulator, "b/report.part") == kept
    text = ossyncd("list", "-c", d.config).stdout
    assert "temp name: vim-probe" in text

    # a download that paused past the settle time, then got its final name
    dl = random_file(drop / "movie.mp4.part", 900, seed=2)
    wait_until(lambda: str(drop / "movie.mp4.part") in skipped(), 30, interval=0.3, what="the paused .part")
    os.rename(drop / "movie.mp4.part", drop / "movie.mp4")
    wait_until(lambda: any(f["path"] == str(drop / "movie.mp4") and f["state"] == "done" for f in d.files()),
               30, interval=0.3, what="movie.mp4 uploaded")
    assert object_bytes(emulator, "a/movie.mp4") == dl
    wait_until(lambda: str(drop / "movie.mp4.part") not in skipped(), 10, interval=0.3,
               what="the renamed temp's skipped row gone")
    problems = [f["path"] for f in d.status()["failures"]]
    assert str(drop / "movie.mp4.part") not in problems
    assert str(drop / "4913") in problems or len(problems) == 10     # real files stay visible
    assert d.stop() == 0


@pytest.mark.parametrize("prefix", ["", "in/", "in", "/x/", "pré/"])
@pytest.mark.parametrize("spec", [None, {}, {"unicode_normalize": "none"}, {"key_template": "{prefix}{dir}{stem}{ext}"}])
def test_the_walks_inline_file_entries_equal_the_one_path_rules(tmp_path, prefix, spec):
    """The walk builds a plain file's entry inline (scanner.dir_keys); every entry must be
    what the one-path rules (stat_entry) say of it: key, kind, reason, identity."""
    from ossyncd.config import ObjectSpec

    deep = tmp_path.joinpath(*["a" * 200] * 4)
    names = ["plain.txt", "\\lead.txt", "ctrl\x01.txt", "del\x7f.txt", "tab\t.txt", "ok é 写真.txt",
             "cafe\u0301.txt", "b" * 200, "~$lock.docx", "x.tmp"]
    for folder in (tmp_path, tmp_path / "cafe\u0301", tmp_path / "ctl\x02", deep):
        for name in names:
            write(folder / name)
    base = len(prefix.rstrip("/")) + 1 if prefix else 0
    for n in (1023 - base - 4 * 201, 1024 - base - 4 * 201):   # at and over the key limit
        write(deep / ("c" * n))
    os.close(os.open(os.fsencode(tmp_path) + b"/bad\xff.txt", os.O_CREAT | os.O_WRONLY, 0o644))
    w = make_watch(tmp_path, prefix=prefix)
    if spec is not None:
        w.object = ObjectSpec(**spec)
    got = list(scan_root(w, with_temp=True))
    assert len(got) == 4 * len(names) + 3
    kinds = set()
    for e in got:
        assert e == stat_entry(w, e.path, with_temp=True), e.relpath
        kinds.add(e.kind)
    assert kinds == ({"skipped", "temp"} if prefix.startswith("/") else {"file", "skipped", "temp"})
