"""Real watchdog on real folders: inotify, the polling fallback, real writers."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from structlog.testing import capture_logs

import ossyncd
from ossyncd import watcher as watcher_mod
from ossyncd.paths import is_temp_name
from ossyncd.settle import CLOSED, RENAMED
from ossyncd.watcher import Watcher

pytestmark = pytest.mark.timeout(30)

POLL = 0.2


def make_watch(root, index=0, **kw):
    base = dict(index=index, path=Path(root), prefix="", recursive=True, exclude=(),
                settle_seconds=2.0, after_upload="keep", move_to=None, follow_symlinks=False)
    base.update(kw)
    return SimpleNamespace(**base)


class Events:
    def __init__(self):
        self.cond = threading.Condition()
        self.items: list[tuple[int, str, bool, float]] = []

    def __call__(self, watch, path, how):
        assert isinstance(path, str)
        with self.cond:
            self.items.append((watch.index, path, how, time.monotonic()))
            self.cond.notify_all()

    def paths(self, how=None):
        with self.cond:
            return {p for _, p, c, _ in self.items if how is None or c == how}

    def wait(self, pred, timeout=10.0):
        end = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def wait_paths(self, paths, how=None, timeout=10.0):
        want = {str(p) for p in paths}
        ok = self.wait(lambda: want <= self._paths_nolock(how), timeout)
        assert ok, f"missing {sorted(want - self.paths(how))}; got {sorted(self.paths())}"

    def _paths_nolock(self, how):
        return {p for _, p, c, _ in self.items if how is None or c == how}


@pytest.fixture
def run_watcher():
    started = []

    def start(watches, events, **kw):
        w = Watcher(events, poll_interval=POLL, **kw)
        for watch in watches:
            w.add(watch)
        w.start()
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def dirs(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    return root, outside


def quiet(seconds=0.6):
    time.sleep(seconds)  # let late events (if any, wrongly) arrive


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_cp_reports_final_name(dirs, run_watcher, polling):
    root, outside = dirs
    src = outside / "photo.jpg"
    src.write_bytes(os.urandom(300_000))
    ev = Events()
    w = make_watch(root)
    wt = run_watcher([w], ev, force_polling_for={0} if polling else ())
    assert wt.backend(w) == ("polling" if polling else "inotify")
    subprocess.run(["cp", str(src), str(root / "photo.jpg")], check=True)
    # inotify reports the close; polling cannot, the settle timer covers it.
    ev.wait_paths([root / "photo.jpg"], how=None if polling else CLOSED)
    quiet()
    assert ev.paths() == {str(root / "photo.jpg")}


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed (apt-get install rsync)")
def test_rsync_reports_final_names_only(dirs, run_watcher):
    root, outside = dirs
    src = outside / "src"
    (src / "nested/deeper").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(3_000_000))
    (src / "small.txt").write_text("hello")
    (src / "nested/n.txt").write_text("n")
    (src / "nested/deeper/d.txt").write_text("d")
    (root / "dst").mkdir()
    ev = Events()
    run_watcher([make_watch(root)], ev)
    subprocess.run(["rsync", "-a", f"{src}/", f"{root / 'dst'}/"], check=True)
    finals = [root / "dst/big.bin", root / "dst/small.txt", root / "dst/nested/n.txt", root / "dst/nested/deeper/d.txt"]
    ev.wait_paths(finals)
    # rsync writes .name.XXXXXX then renames; in an already watched folder the
    # rename is the event (RENAMED). Files in folders rsync just created may be
    # found by watchdog's catch-up walk instead (WRITTEN); both are fine.
    ev.wait_paths([root / "dst/big.bin", root / "dst/small.txt"], how=RENAMED)
    quiet()
    got = ev.paths()
    assert got == {str(p) for p in finals}
    assert not any(is_temp_name(os.path.basename(p)) for p in got)


def test_slow_appender(dirs, run_watcher):
    root, _ = dirs
    ev = Events()
    run_watcher([make_watch(root)], ev)
    target = root / "slow.bin"
    with open(target, "wb") as f:
        for _ in range(8):
            f.write(os.urandom(1000))
            f.flush()
            time.sleep(0.1)
        closed_at = time.monotonic()
    ev.wait(lambda: any(c for _, _, c, _ in ev.items))
    with ev.cond:
        items = list(ev.items)
    assert {p for _, p, _, _ in items} == {str(target)}
    opens = [t for _, _, c, t in items if not c]
    closes = [t for _, _, c, t in items if c]
    assert len(opens) >= 4  # modified while writing, never reported closed
    assert len(closes) == 1 and closes[0] >= closed_at


def test_mv_file_and_folder_into_root(dirs, run_watcher):
    root, outside = dirs
    (outside / "one.jpg").write_bytes(b"1" * 1000)
    (outside / "batch/sub").mkdir(parents=True)
    for rel in ("batch/a.jpg", "batch/b.jpg", "batch/sub/c.jpg", "batch/.b.jpg.XyZ123"):
        (outside / rel).write_bytes(b"z")
    ev = Events()
    run_watcher([make_watch(root)], ev)
    subprocess.run(["mv", str(outside / "one.jpg"), str(root / "one.jpg")], check=True)
    subprocess.run(["mv", str(outside / "batch"), str(root / "batch")], check=True)
    want = [root / "one.jpg", root / "batch/a.jpg", root / "batch/b.jpg", root / "batch/sub/c.jpg"]
    ev.wait_paths(want, how=RENAMED)  # a rename is atomic: complete under its final name
    quiet()
    assert ev.paths() == {str(p) for p in want}  # the temp name inside never shows


def test_rename_inside_root_reports_destination(dirs, run_watcher):
    root, _ = dirs
    ev = Events()
    run_watcher([make_watch(root)], ev)
    (root / "a.txt").write_text("x")
    ev.wait_paths([root / "a.txt"], how=CLOSED)
    os.rename(root / "a.txt", root / "b.txt")
    ev.wait_paths([root / "b.txt"], how=RENAMED)


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_temp_excluded_and_move_to_never_reported(dirs, run_watcher, polling):
    root, _ = dirs
    (root / "done").mkdir()
    (root / "logs").mkdir()
    ev = Events()
    w = make_watch(root, exclude=("*.log", "logs/*"), after_upload="move", move_to=root / "done")
    run_watcher([w], ev, force_polling_for={str(root)} if polling else ())
    (root / ".x.jpg.AbC123").write_bytes(b"tmp")  # rsync style
    os.rename(root / ".x.jpg.AbC123", root / "x.jpg")
    (root / "dl.part").write_bytes(b"p")  # browser style
    os.rename(root / "dl.part", root / "dl.bin")
    (root / "~$doc.docx").write_bytes(b"o")
    (root / "app.log").write_text("l")
    (root / "logs/x.txt").write_text("l")
    (root / "done/old.jpg").write_text("d")
    (root / "kept.txt").write_text("k")
    want = {root / "x.jpg", root / "dl.bin", root / "kept.txt"}
    ev.wait_paths(want)
    quiet(3 * POLL if polling else 0.6)
    assert ev.paths() == {str(p) for p in want}


def test_not_recursive(dirs, run_watcher):
    root, _ = dirs
    (root / "sub").mkdir()
    ev = Events()
    run_watcher([make_watch(root, recursive=False)], ev)
    (root / "sub/deep.txt").write_text("x")
    (root / "top.txt").write_text("x")
    ev.wait_paths([root / "top.txt"], how=CLOSED)
    quiet()
    assert ev.paths() == {str(root / "top.txt")}


def test_force_polling_env(dirs, run_watcher, monkeypatch):
    root, _ = dirs
    monkeypatch.setenv("OSSYNCD_FORCE_POLLING", "1")
    ev = Events()
    w = make_watch(root)
    wt = run_watcher([w], ev)
    assert wt.backend(w) == "polling"
    (root / "d").mkdir()
    (root / "d/f.txt").write_text("x")
    ev.wait_paths([root / "d/f.txt"])


def test_remove_stops_events_for_that_root(tmp_path, run_watcher):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ev = Events()
    wa, wb = make_watch(a, index=0), make_watch(b, index=1)
    wt = run_watcher([wa, wb], ev)
    (a / "1.txt").write_text("x")
    ev.wait_paths([a / "1.txt"], how=CLOSED)
    wt.remove(wa)
    assert wt.backend(wa) is None and wt.backend(wb) == "inotify"
    (a / "2.txt").write_text("x")
    (b / "3.txt").write_text("x")
    ev.wait_paths([b / "3.txt"], how=CLOSED)
    quiet()
    assert str(a / "2.txt") not in ev.paths()
    wt.add(wa)  # and back
    (a / "4.txt").write_text("x")
    ev.wait_paths([a / "4.txt"], how=CLOSED)


def test_add_after_start_and_stop_start(dirs, run_watcher):
    root, _ = dirs
    ev = Events()
    wt = run_watcher([], ev)
    w = make_watch(root)
    wt.add(w)
    assert wt.backend(w) == "inotify"
    wt.stop()
    assert wt.backend(w) is None
    wt.start()
    (root / "f").write_text("x")
    ev.wait_paths([root / "f"], how=CLOSED)


def test_callback_error_does_not_kill_the_watcher(dirs, run_watcher):
    root, _ = dirs
    ev = Events()

    def flaky(watch, path, how):
        if path.endswith("boom"):
            raise RuntimeError("callback bug")
        ev(watch, path, how)

    with capture_logs() as logs:
        run_watcher([make_watch(root)], flaky)
        (root / "boom").write_text("x")
        (root / "after").write_text("x")
        ev.wait_paths([root / "after"], how=CLOSED)
    assert any(e["event"] == "watch_event_failed" for e in logs)


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_dead_event_thread_is_noticed_and_re_arming_restores_events(dirs, run_watcher, polling):
    """No event would ever come from a root whose emitter thread ended; the scheduler asks
    alive() every second and re-arms it (Watcher.add)."""
    root, _ = dirs
    ev = Events()
    watch = make_watch(root)
    w = run_watcher([watch], ev, force_polling_for=[0] if polling else ())
    assert w.alive(watch)
    for emitter in list(w._roots[0].observer.emitters):   # the thread ends, as after a crash
        emitter.stop()
        emitter.join(5)
    assert not w.alive(watch)
    w.add(watch)
    assert w.alive(watch)
    (root / "after").write_text("x")
    ev.wait_paths([root / "after"])


def test_a_thread_that_crashes_in_the_daemon_is_one_log_line():
    from ossyncd.app import _log_thread_crash

    def boom():
        raise RuntimeError("emitter bug")

    old = threading.excepthook
    threading.excepthook = _log_thread_crash
    try:
        with capture_logs() as logs:
            t = threading.Thread(target=boom, name="emitter-x")
            t.start()
            t.join(5)
    finally:
        threading.excepthook = old
    crashed = [e for e in logs if e["event"] == "thread_crashed"]
    assert len(crashed) == 1 and crashed[0]["thread"] == "emitter-x", logs
    assert "emitter bug" in crashed[0]["error"] and crashed[0]["log_level"] == "error"


def test_missing_root_raises_clearly(tmp_path):
    wt = Watcher(Events())
    try:
        wt.add(make_watch(tmp_path / "nope"))
        with capture_logs() as logs, pytest.raises(FileNotFoundError):
            wt.start()
        assert logs[0]["event"] == "watch_failed"
    finally:
        wt.stop()


# -- inotify limits ------------------------------------------------------------

def test_limit_at_our_seam_falls_back_to_polling(dirs, run_watcher, monkeypatch):
    """Injected ENOSPC where our code builds the observer (always runs; the
    real-kernel version is test_inotify_limits_in_user_namespace)."""
    root, _ = dirs

    def no_watches(*a, **k):
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watcher_mod, "_new_inotify_observer", no_watches)
    ev = Events()
    w = make_watch(root)
    with capture_logs() as logs:
        wt = run_watcher([w], ev)
    assert wt.backend(w) == "polling"
    (err,) = [e for e in logs if e["log_level"] == "error"]
    assert err["event"] == "inotify_limit_reached" and err["sysctl"] == "fs.inotify.max_user_watches"
    assert "sysctl fs.inotify.max_user_watches=524288" in err["fix"]
    (root / "f.txt").write_text("x")
    ev.wait_paths([root / "f.txt"])


_LIMIT_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from types import SimpleNamespace as NS
    from structlog.testing import capture_logs
    from ossyncd.watcher import Watcher

    root, mode = Path(sys.argv[1]), sys.argv[2]
    def setlim(name, value):
        with open(f"/proc/sys/user/{name}", "w") as f:
            f.write(str(value))
    def wait(pred, timeout=10):
        end = time.monotonic() + timeout
        while not pred() and time.monotonic() < end:
            time.sleep(0.05)
        return pred()
    seen = set()
    w = NS(index=0, path=root, prefix="", recursive=True, exclude=(), settle_seconds=2.0,
           after_upload="keep", move_to=None, follow_symlinks=False)
    res = {}
    with capture_logs() as logs:
        wt = Watcher(lambda watch, p, how: seen.add(p), poll_interval=0.2)
        wt.add(w)
        if mode == "watches-startup":      # root + 9 folders need 10 watches
            setlim("max_inotify_watches", 5)
            wt.start()
            res["backend_at_start"] = wt.backend(w)
            new = root / "d8" / "new.txt"
        elif mode == "watches-runtime":    # enough at start, not for a new folder
            setlim("max_inotify_watches", 10)
            wt.start()
            res["backend_at_start"] = wt.backend(w)
            (root / "n1").mkdir()
            (root / "n1" / "n2").mkdir()
            wait(lambda: wt.backend(w) == "polling")
            new = root / "n1" / "n2" / "late.txt"
        elif mode == "instances":
            setlim("max_inotify_instances", 0)
            wt.start()
            res["backend_at_start"] = wt.backend(w)
            new = root / "d0" / "new.txt"
        new.write_text("x")
        res["reported"] = wait(lambda: str(new) in seen)
        res["old_file_reported"] = str(root / "d3" / "old.txt") in seen
        res["backend"] = wt.backend(w)
        wt.stop()
    res["logs"] = [dict(e) for e in logs if e["log_level"] in ("error", "warning")]
    print(json.dumps(res, default=str))
    """
)


def _run_in_userns(root: Path, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(ossyncd.__file__).parent.parent))
    cmd = ["unshare", "--user", "--map-root-user", sys.executable, "-c", _LIMIT_SCRIPT, str(root), mode]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=25)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _userns_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = "echo 7 > /proc/sys/user/max_inotify_watches"
    return subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", probe],
                          capture_output=True, timeout=10).returncode == 0


@pytest.mark.skipif(not _userns_available(), reason="no user namespaces here: covered by the seam test only")
@pytest.mark.parametrize("mode", ["watches-startup", "watches-runtime", "instances"])
def test_inotify_limits_in_user_namespace(tmp_path, mode):
    """The real kernel limit, honestly: inotify limits are counted per user
    namespace (Linux >= 5.11), so a child namespace gets a tiny limit of its
    own (/proc/sys/user/max_inotify_*) without touching the host's
    fs.inotify.* that other processes on this machine depend on."""
    for i in range(9):
        (tmp_path / f"d{i}").mkdir()
    (tmp_path / "d3/old.txt").write_text("o")
    res = _run_in_userns(tmp_path, mode)
    errors = [e for e in res["logs"] if e["event"] == "inotify_limit_reached"]
    assert len(errors) == 1, res
    sysctl = "fs.inotify.max_user_instances" if mode == "instances" else "fs.inotify.max_user_watches"
    assert errors[0]["sysctl"] == sysctl and f"sysctl {sysctl}=" in errors[0]["fix"]
    assert res["backend"] == "polling"
    assert res["reported"], "a file in a folder inotify could not watch was missed"
    if mode == "watches-runtime":
        assert res["backend_at_start"] == "inotify"
        # Events may have been lost during the switch: the root is re-walked.
        assert res["old_file_reported"]
        assert any(e["event"] == "watch_events_lost" for e in res["logs"])
    else:
        assert res["backend_at_start"] == "polling"
