"""mark_done's group commit keeps the durability order (docs/architecture.md §4): rows of
workers that finish together go into one transaction, and no caller hears `done` before
that transaction committed; a batch that fails to commit leaves no `done` and no event."""

from __future__ import annotations

import threading

import pytest

from ossyncd.errors import StateError
from ossyncd.model import Identity
from ossyncd.state import State
from tests.helpers import wait_until

N = 6


def _rows(st: State, names: list[str]) -> list:
    rows = []
    for i, name in enumerate(names):
        row, _ = st.observe(f"/w/{name}", "/w", name, Identity(10 + i, 1, 100 + i, 2))
        st.begin_upload(row.id, f"up-{i}", name, 5, row.identity)   # forgotten with `done`
        rows.append(row)
    return rows


def _done_elsewhere(path) -> set[str]:
    """What another connection (`ossyncd status`) sees as done: only what was committed."""
    ro = State(path, readonly=True)
    try:
        return {r.path for r in ro.files("done")}
    finally:
        ro.close()


def _mark_all_while_held(st: State, rows: list) -> tuple[dict, list[threading.Thread]]:
    """Start one mark_done per row while the test holds the state lock (as a committing
    leader would), so every request is queued before any is committed."""
    results: dict[str, object] = {}

    def worker(row):
        try:
            results[row.path] = st.mark_done(row.id, row.identity, url="u", etag="E", crc64=7, mode="simple")
            results[row.path + ":seen"] = row.path in _done_elsewhere(st.path)   # committed when told
        except StateError as e:
            results[row.path] = e

    threads = [threading.Thread(target=worker, args=(r,)) for r in rows]
    for t in threads:
        t.start()
    wait_until(lambda: len(st._done_queue) == len(rows), 10, what="every mark_done queued")
    return results, threads


def test_workers_finishing_together_share_one_commit_and_hear_done_only_after_it(tmp_path):
    st = State(tmp_path / "state.db")
    st.router = lambda kind, watch, path: ["h"] if kind == "uploaded" else []
    rows = _rows(st, [f"f{i}" for i in range(N)])
    commits = st.done_commits
    with st._lock:
        results, threads = _mark_all_while_held(st, rows)
        assert not results                          # nobody told `done` ...
        assert _done_elsewhere(st.path) == set()    # ... and nothing committed yet
    for t in threads:
        t.join(10)
    assert st.done_commits == commits + 1           # one transaction for all N
    assert all(results[r.path] is True and results[r.path + ":seen"] is True for r in rows), results
    assert _done_elsewhere(st.path) == {r.path for r in rows}
    assert sorted(e.path for e in st.events()) == sorted(r.path for r in rows)   # the outbox, same commit
    assert st.uploads() == []
    st.close()


def test_a_batch_that_fails_to_commit_leaves_no_done_and_no_event(tmp_path):
    st = State(tmp_path / "state.db")
    st.router = lambda kind, watch, path: ["h"]
    rows = _rows(st, [f"f{i}" for i in range(N - 1)] + ["boom"])
    # a real SQLite failure inside the batch's transaction, after the other rows were written in it
    st.db.execute("CREATE TRIGGER fail_done BEFORE UPDATE OF state ON files WHEN NEW.state = 'done'"
                  " AND NEW.path = '/w/boom' BEGIN SELECT RAISE(ABORT, 'injected commit failure'); END")
    with st._lock:
        results, threads = _mark_all_while_held(st, rows)
    for t in threads:
        t.join(10)
    assert all(isinstance(results[r.path], StateError) for r in rows), results
    assert "injected commit failure" in str(results["/w/boom"])
    assert _done_elsewhere(st.path) == set()
    assert st.counts() == {"queued": N}
    assert st.events() == [] and len(st.uploads()) == N   # the upload records are kept for a resume
    # the next batch, without the failing row, commits
    st.db.execute("DROP TRIGGER fail_done")
    assert st.mark_done(rows[0].id, rows[0].identity, url="u", etag="E", crc64=7, mode="simple")
    assert _done_elsewhere(st.path) == {rows[0].path}
    st.close()


def test_a_newer_version_is_not_marked_done_by_a_batch(tmp_path):
    st = State(tmp_path / "state.db")
    old, new = _rows(st, ["a", "b"])
    st.observe(old.path, "/w", "a", Identity(99, 9, 999, 9))   # a newer version seen during the upload
    with st._lock:
        results, threads = _mark_all_while_held(st, [old, new])
    for t in threads:
        t.join(10)
    assert results[old.path] is False and results[new.path] is True
    assert st.get(old.path).state == "queued" and st.get(new.path).state == "done"
    st.close()


def test_mark_done_inside_a_transaction_commits_with_it(tmp_path):
    st = State(tmp_path / "state.db")
    (row,) = _rows(st, ["t"])
    with pytest.raises(RuntimeError):
        with st.transaction():
            assert st.mark_done(row.id, row.identity, url="u", etag="E", crc64=7, mode="simple")
            raise RuntimeError("the caller's transaction fails")
    assert st.get(row.path).state == "queued"
    st.close()
