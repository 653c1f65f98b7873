"""Scheduler.tick(now) and Uploader.run in-process, on a real State (a file under tmp_path) and the
in-memory store (tests/fakes.py, held to the emulator's rules by tests/test_store_contract.py):
fairness between big and small files, pause, and a file that vanishes or changes before Complete."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ossyncd.config import Config, OssConfig, StateConfig, UploadConfig, WatchConfig
from ossyncd.scheduler import Scheduler
from ossyncd.settle import CLOSED
from ossyncd.state import State
from ossyncd.uploader import Uploader
from tests.fakes import FakeClock, MemoryStore
from tests.helpers import random_file, wait_until

KiB = 1024
PART = 128 * KiB
PREFIX = "in/"
GATE_TIMEOUT = 30   # a blocked request gives up after this, so a failing test cannot hang


class Rig:
    """A scheduler with its uploader on a MemoryStore, ticked by hand with a fake clock."""

    def __init__(self, tmp_path, **upload):
        self.root = tmp_path / "in"
        self.root.mkdir()
        up = UploadConfig(multipart_threshold=2 * PART, part_size=PART, file_retry_delay=1.0,
                          file_retry_delay_max=2.0, **upload)
        self.cfg = Config(oss=OssConfig(endpoint="http://127.0.0.1:9", bucket="unused", signature="v1"), upload=up,
                          state=StateConfig(path=tmp_path / "state.db"),
                          watch=(WatchConfig(path=self.root, prefix=PREFIX, settle_seconds=1.0),))
        self.state = State(self.cfg.state.path)
        self.store = MemoryStore()
        self.part_pool = ThreadPoolExecutor(up.parallel_parts, thread_name_prefix="part")
        self.uploader = Uploader(self.state, self.store, up, part_pool=self.part_pool,
                                 url_for=lambda key: f"memory://{key}")
        self.sched = Scheduler(self.state, self.uploader, self.cfg)
        self.clock = FakeClock()
        self.max_big = 0      # the most multipart files ever in flight at once
        self.gates: list[threading.Event] = []   # opened at teardown, so no thread stays held

    def tick(self) -> None:
        self.sched.tick(self.clock.advance(0.5))
        jobs = list(self.sched.jobs.values())
        assert len(jobs) <= self.cfg.upload.max_files_in_flight
        self.max_big = max(self.max_big, sum(j.multipart for j in jobs))

    def run_until(self, predicate, what: str, timeout: float = 30) -> None:
        def step():
            self.tick()
            return predicate()
        wait_until(step, timeout, what=what)

    def add(self, name: str, size: int, seed: int) -> bytes:
        """A new file, announced as the watcher does (a close after write)."""
        data = random_file(self.root / name, size, seed)
        self.sched.on_event(self.cfg.watch[0], str(self.root / name), CLOSED)
        return data

    def row(self, name: str):
        return self.state.get(str(self.root / name))

    def states(self, *names: str) -> list[str]:
        return [getattr(self.row(n), "state", "unknown") for n in names]

    def close(self) -> None:
        for gate in self.gates:
            gate.set()
        self.sched.shutdown(timeout=5)
        self.part_pool.shutdown(wait=True, cancel_futures=True)
        self.state.close()


@pytest.fixture
def rig(tmp_path):
    rigs = []

    def make(**upload) -> Rig:
        r = Rig(tmp_path, **upload)
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        r.close()


def gate_requests(r: Rig, op: str, *, pass_first: int, gate: threading.Event, on_block=None) -> threading.Event:
    """Let the first `pass_first` calls of `op` through; later ones wait for `gate`. Returns an
    event set when a call is held (on_block, if given, runs then: e.g. change the file)."""
    held = threading.Event()
    seen = [0]
    lock = threading.Lock()

    def before(o: str, key: str) -> None:
        if o != op:
            return
        with lock:
            seen[0] += 1
            n = seen[0]
        if n <= pass_first:
            return
        if on_block is not None and not held.is_set():
            on_block()
        held.set()
        assert gate.wait(GATE_TIMEOUT), f"{op} {key} held longer than {GATE_TIMEOUT} s"
    r.gates.append(gate)
    r.store.before = before
    return held


@pytest.mark.timeout(120)
def test_multipart_files_never_take_the_last_slot_and_small_files_keep_flowing(rig):
    r = rig(max_files_in_flight=2, parallel_parts=2)
    gate = threading.Event()
    gate_requests(r, "UploadPart", pass_first=0, gate=gate)   # big files hang on their parts
    big = {n: random_file(r.root / n, 4 * PART, seed=i) for i, n in enumerate(["big1.bin", "big2.bin"])}
    r.run_until(lambda: sorted(r.states(*big)) == ["queued", "uploading"], "one big file in flight")
    small = {f"s{i}.bin": r.add(f"s{i}.bin", 10 * KiB + i, seed=10 + i) for i in range(6)}
    r.run_until(lambda: r.states(*small) == ["done"] * len(small), "every small file uploaded past the big one")
    # the second big file waited for the first even though a slot was free all along
    assert sorted(r.states(*big)) == ["queued", "uploading"]
    assert r.store.requests["InitiateMultipartUpload"] == 1
    assert r.max_big == 1
    gate.set()
    r.run_until(lambda: r.states(*big) == ["done", "done"], "both big files uploaded")
    assert r.max_big == 1
    for name, data in {**big, **small}.items():
        assert r.store.data(PREFIX + name) == data, name
    assert r.store.uploads == {}


@pytest.mark.timeout(120)
def test_pause_requeues_in_flight_files_and_keeps_their_parts(rig):
    r = rig(max_files_in_flight=1, parallel_parts=1)
    gate = threading.Event()
    held = gate_requests(r, "UploadPart", pass_first=2, gate=gate)
    data = random_file(r.root / "p.bin", 4 * PART, seed=3)
    r.run_until(held.is_set, "the third part in flight")
    row = r.row("p.bin")
    up = r.state.upload_for(row.id)
    assert sorted(r.state.parts(up.id)) == [1, 2]
    r.state.set_meta("paused", "1")      # what `ossyncd pause` writes
    r.tick()
    gate.set()                           # the held part now meets the cancelled scope
    r.run_until(lambda: not r.sched.jobs and r.states("p.bin") == ["queued"], "the file back in the queue")
    assert r.state.upload_for(row.id) == up and sorted(r.state.parts(up.id)) == [1, 2]
    assert [u.upload_id for u in r.store.list_uploads(PREFIX)] == [up.upload_id]
    for _ in range(5):                   # paused: nothing is dispatched
        r.tick()
    assert r.states("p.bin") == ["queued"] and not r.sched.jobs
    r.state.set_meta("paused", "0")
    r.run_until(lambda: r.states("p.bin") == ["done"], "the file uploaded after resume")
    assert r.store.data(PREFIX + "p.bin") == data
    # parts 1 and 2 were kept, not sent again: 2 + the cancelled 3rd + parts 3 and 4
    assert r.store.requests["UploadPart"] == 5
    assert r.store.requests["InitiateMultipartUpload"] == 1 and r.store.requests["ListParts"] == 1
    assert r.store.uploads == {}


@pytest.mark.timeout(120)
def test_a_file_that_vanishes_before_complete_is_gone_and_its_upload_aborted(rig):
    r = rig(max_files_in_flight=1, parallel_parts=1)
    gate = threading.Event()
    gate.set()                           # nothing waits: the hook only deletes the file
    src = r.root / "v.bin"
    random_file(src, 3 * PART, seed=4)
    gate_requests(r, "UploadPart", pass_first=2, gate=gate, on_block=lambda: os.unlink(src))
    r.run_until(lambda: r.states("v.bin") == ["gone"] and not r.sched.jobs, "the file gone")
    assert "vanished" in r.row("v.bin").error
    assert r.store.requests["CompleteMultipartUpload"] == 0
    assert r.store.requests["AbortMultipartUpload"] >= 1 and r.store.uploads == {}
    assert r.state.upload_for(r.row("v.bin").id) is None
    assert r.store.objects == {}


@pytest.mark.timeout(120)
def test_a_file_that_changes_before_complete_is_requeued_and_sent_again(rig):
    r = rig(max_files_in_flight=1, parallel_parts=1)
    gate = threading.Event()
    gate.set()
    src = r.root / "c.bin"
    random_file(src, 3 * PART, seed=5)
    new = {}

    def rewrite():
        new["data"] = random_file(src, 3 * PART + 17, seed=6)
    gate_requests(r, "UploadPart", pass_first=2, gate=gate, on_block=rewrite)
    r.run_until(lambda: r.states("c.bin") == ["done"], "the new version uploaded")
    assert r.store.data(PREFIX + "c.bin") == new["data"]
    assert r.store.requests["InitiateMultipartUpload"] == 2       # the old upload was given up
    assert r.store.requests["AbortMultipartUpload"] >= 1 and r.store.uploads == {}
    assert r.store.requests["CompleteMultipartUpload"] == 1
