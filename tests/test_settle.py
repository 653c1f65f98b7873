"""Settle rules with an injected clock: every ``now`` is passed in."""

import pytest

from ossyncd.settle import CLOSED, RENAMED, WRITTEN, SettleTracker

pytestmark = pytest.mark.timeout(10)


class Clock:
    """Drives a tracker the way the scheduler does: sleep to next_deadline()
    (or the next event), collect ready() paths, confirm them with a restat."""

    def __init__(self, tracker, disk):
        self.t = 0.0
        self.tr = tracker
        self.disk = disk  # path -> (size, mtime_ns), the caller's "stat"
        self.got: list[tuple[float, str]] = []

    def run_until(self, until):
        while True:
            d = self.tr.next_deadline()
            if d is None or d > until:
                break
            self.t = max(self.t, d)
            self.poll()
        self.t = until
        self.poll()

    def poll(self):
        for p in self.tr.ready(self.t):
            st = self.disk.get(p)
            if self.tr.confirm(p, *(st or (None, None)), self.t):
                self.got.append((self.t, p))

    def event(self, path, how=WRITTEN):
        self.tr.observe(path, *self.disk[path], self.t, how)


def test_closed_then_quiet_is_ready_after_quiet_period():
    tr = SettleTracker(2.0)
    assert tr.close_quiet == pytest.approx(0.2)
    tr.observe("a", 10, 1, now=0.0)
    tr.observe("a", 20, 2, now=0.1, how=CLOSED)
    assert tr.ready(0.29) == []
    d = tr.next_deadline()
    assert d == pytest.approx(0.3)
    assert tr.ready(d) == ["a"]
    assert tr.ready(5.0) == []  # handed out once
    assert tr.next_deadline() is None


def test_close_quiet_is_capped_by_settle():
    assert SettleTracker(0.05).close_quiet == 0.05
    assert SettleTracker(0).close_quiet == 0


def test_no_close_needs_full_settle_without_events():
    tr = SettleTracker(2.0)
    tr.observe("a", 10, 1, now=0.0)
    assert tr.ready(1.99) == []
    assert tr.next_deadline() == 2.0
    assert tr.ready(2.0) == ["a"]


def test_events_without_change_still_delay_unclosed():
    tr = SettleTracker(2.0)
    tr.observe("a", 10, 1, now=0.0)
    tr.observe("a", 10, 1, now=1.5)  # an event: the writer may be busy
    assert tr.ready(2.0) == []
    assert tr.next_deadline() == 3.5
    assert tr.ready(3.5) == ["a"]


def test_size_change_resets():
    tr = SettleTracker(2.0)
    tr.observe("a", 10, 1, now=0.0)
    tr.observe("a", 11, 1, now=1.9)
    assert tr.ready(2.5) == []
    assert tr.ready(3.9) == ["a"]


def test_event_after_close_with_same_stat_keeps_close():
    # A moved-in folder: walked (closed) then watchdog's own "created" events.
    tr = SettleTracker(2.0)
    tr.observe("a", 10, 1, now=0.0, how=CLOSED)
    tr.observe("a", 10, 1, now=0.05, how=WRITTEN)
    assert tr.ready(0.25) == ["a"]


def test_slow_appender_keeping_file_open_never_ready_while_writing():
    # Writes every 0.5 s for 10 s, settle 2 s: nothing until 2 s after the last write.
    disk = {}
    c = Clock(SettleTracker(2.0), disk)
    size = 0
    for i in range(21):
        c.run_until(i * 0.5)
        size += 100
        disk["log.bin"] = (size, 1000 + i)
        c.event("log.bin")
        assert c.got == [], f"ready while writing at t={c.t}"
    c.event("log.bin", how=CLOSED)  # finally closes at t=10
    c.run_until(20)
    assert c.got == [(pytest.approx(10.2), "log.bin")]


def test_slow_appender_that_reopens_each_write():
    # open/append/close every 0.5 s: the first close looks final (a writer
    # gap longer than the quiet period cannot be told apart from a finished
    # file; the upload's restat catches it). Once a reopen is seen, a close no
    # longer shortcuts and the path needs the full settle time.
    disk = {}
    c = Clock(SettleTracker(2.0), disk)
    for i in range(21):
        c.run_until(i * 0.5)
        disk["a.log"] = (100 * (i + 1), 1000 + i)
        c.event("a.log")
        c.event("a.log", how=CLOSED)
    c.run_until(30)
    times = [t for t, _ in c.got]
    assert times[0] == pytest.approx(0.2)  # first cycle, see above
    assert times[1:] == [pytest.approx(12.0)]  # 2 s after the last write, not before


def test_confirm_detects_change_between_ready_and_restat():
    tr = SettleTracker(2.0)
    tr.observe("a", 10, 1, now=0.0, how=CLOSED)
    assert tr.ready(0.2) == ["a"]
    assert tr.confirm("a", 12, 2, now=0.3) is False  # grew: settles again (reopened)
    assert tr.ready(0.6) == []
    assert tr.ready(2.3) == ["a"]
    assert tr.confirm("a", 12, 2, now=2.3) is True


def test_confirm_vanished_forgets():
    tr = SettleTracker(2.0)
    tr.observe("a", 10, 1, now=0.0, how=CLOSED)
    assert tr.ready(1.0) == ["a"]
    assert tr.confirm("a", None, None, now=1.0) is False
    assert len(tr._recs) == 0


def test_closed_then_renamed_is_handled_by_final_name():
    disk = {"data.bin": (50, 7)}
    c = Clock(SettleTracker(2.0), disk)
    c.event("data.bin", how=CLOSED)
    c.t = 0.05
    disk["final.bin"] = disk.pop("data.bin")  # mv data.bin final.bin
    c.event("final.bin", how=RENAMED)  # the watcher reports the dest, renamed into place
    c.run_until(5)
    assert c.got == [(pytest.approx(0.05), "final.bin")]   # a rename is final: no close_quiet
    assert set(c.tr._recs) == {"final.bin"}  # the old name was dropped at restat


def test_renamed_is_ready_at_once_but_a_change_after_it_waits_the_full_settle():
    disk = {"a": (50, 7), "b": (10, 1)}
    c = Clock(SettleTracker(2.0), disk)
    c.event("a", how=RENAMED)
    c.event("b", how=CLOSED)
    c.t = 0.01
    disk["a"] = (60, 8)                 # written again under its final name: a writer still at it
    c.event("a")
    c.run_until(5)
    assert c.got == [(pytest.approx(0.2), "b"), (pytest.approx(2.01), "a")]


def test_forget():
    tr = SettleTracker(2.0)
    tr.observe("a", 1, 1, now=0.0, how=CLOSED)
    tr.observe("b", 1, 1, now=0.0)
    tr.forget("a")
    tr.forget("never-seen")
    assert tr.ready(10) == ["b"]
    assert len(tr) == 0


def test_same_version_after_hand_out_is_not_repeated_but_a_change_is():
    tr = SettleTracker(2.0)
    tr.observe("a", 10, 1, now=0.0, how=CLOSED)
    assert tr.ready(0.2) == ["a"]
    tr.observe("a", 10, 1, now=1.0, how=CLOSED)  # e.g. opened for write, nothing written
    tr.observe("a", 10, 1, now=1.0)  # a rescan sighting
    assert tr.ready(10) == []
    tr.observe("a", 11, 2, now=10.0, how=CLOSED)  # rewritten after upload: reopen rule
    assert tr.ready(10.2) == []
    assert tr.ready(12.0) == ["a"]


def test_handed_out_records_expire():
    tr = SettleTracker(1.0, retention=5.0)
    for i in range(1000):
        tr.observe(f"f{i}", 1, 1, now=0.0, how=CLOSED)
    assert len(tr.ready(0.2)) == 1000
    tr.ready(5.1)
    assert len(tr._recs) == 1000
    tr.ready(5.2)
    assert tr._recs == {} and not tr._heap


def test_next_deadline_is_precise_and_heap_stays_small():
    tr = SettleTracker(2.0)
    for i in range(100):  # a big copy: many modify events
        tr.observe("big", 100 * i, i, now=i * 0.01)
    assert len(tr._heap) <= 2
    assert tr.next_deadline() == pytest.approx(0.99 + 2.0)
    tr.observe("big", 9900, 99, now=1.0, how=CLOSED)  # a close pulls the deadline in
    assert tr.next_deadline() == pytest.approx(1.2)
    assert tr.ready(1.2) == ["big"]


def test_many_paths_in_deadline_order():
    tr = SettleTracker(1.0)
    for i in range(50):
        tr.observe(f"p{i}", 1, 1, now=float(49 - i))
    out = []
    while (d := tr.next_deadline()) is not None:
        out += tr.ready(d)
    assert out == [f"p{i}" for i in reversed(range(50))]


def test_settling_is_true_only_until_the_version_is_handed_out():
    """What a ready marker asks (markers.py): a marker still settling vouches for nothing."""
    t = SettleTracker(2.0)
    assert not t.settling("m")                      # never seen
    t.observe("m", 0, 1, 0.0)
    assert t.settling("m")
    assert t.ready(1.9) == [] and t.settling("m")
    assert t.ready(2.0) == ["m"] and not t.settling("m")
    t.observe("m", 0, 2, 3.0)                       # written again: settling again
    assert t.settling("m")
    t.forget("m")
    assert not t.settling("m")
