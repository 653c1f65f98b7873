"""What the CLI prints: user data is never read as rich markup, and piped `list` output keeps
whole values (tab-separated, one row per line)."""

import io
import logging
import subprocess

import pytest

from tests.helpers import list_json, object_bytes, ossyncd, random_file, write_config

# "x[/b]y.txt" is the file "b]y.txt" in the folder "x[": its path holds "[/b]", its key does not
NAMES = ["a[draft].txt", "x[/b]y.txt", "[red]r[/red].bin", "[[watch]].dat"]


@pytest.fixture
def config(tmp_path, emulator):
    return write_config(tmp_path / "ossyncd.toml", emulator, state=tmp_path / "state.db")


@pytest.mark.timeout(120)
def test_upload_list_status_print_bracketed_names_as_written(tmp_path, emulator, config):
    src = tmp_path / "reports"
    data = {n: random_file(src / n, 100 + i, seed=i) for i, n in enumerate(NAMES)}
    r = ossyncd("upload", "-c", config, "--prefix", "reports/", *(src / n for n in NAMES))
    assert r.returncode == 0, r.stderr
    assert "MarkupError" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    for n in NAMES:
        assert f"done {src / n} -> " in r.stderr, r.stderr
        assert object_bytes(emulator, f"reports/{(src / n).name}") == data[n]
    listed = ossyncd("list", "-c", config)
    assert listed.returncode == 0, listed.stderr
    for n in NAMES:
        assert f"{src / n}\tdone\t" in listed.stdout and f"\treports/{(src / n).name}\t" in listed.stdout, listed.stdout

    # a failure whose path and reason hold brackets, as `status` shows it
    emulator.set_faults([{"op": "PutObject", "status": 403, "code": "AccessDenied",
                          "message": "denied [/b] [bold]x[/bold]"}])
    bad = tmp_path / "b[/b]ad[x].txt"
    random_file(bad, 10, seed=9)
    r = ossyncd("upload", "-c", config, "--prefix", "reports/", bad)
    assert r.returncode == 1 and "MarkupError" not in r.stderr, r.stderr
    assert f"failed {bad}: " in r.stderr and "[/b] [bold]x[/bold]" in r.stderr, r.stderr
    st = ossyncd("status", "-c", config)
    assert st.returncode == 0, st.stderr
    assert str(bad) in st.stdout and "[/b] [bold]x[/bold]" in st.stdout, st.stdout


def test_config_error_with_brackets_prints_as_written(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('watch = "not a table"\n[oss]\nbucket = "b"\n')
    for cmd in ("status", "list", "upload"):
        args = [cmd, "-c", cfg] + ([tmp_path / "f"] if cmd == "upload" else [])
        r = ossyncd(*args)
        assert r.returncode == 2, (cmd, r.stderr)
        assert "write [[watch]] sections" in r.stderr, (cmd, r.stderr)


@pytest.mark.timeout(120)
def test_piped_list_keeps_long_urls_whole_and_cut_parses_it(tmp_path, emulator, config):
    prefix = "very/deep/" * 12
    f = tmp_path / "with a long name that does not fit in eighty columns [v2].bin"
    data = random_file(f, 1000, seed=3)
    small = random_file(tmp_path / "s.txt", 10, seed=4)
    r = ossyncd("upload", "-c", config, "--prefix", prefix, f, tmp_path / "s.txt")
    assert r.returncode == 0, r.stderr
    assert object_bytes(emulator, prefix + f.name) == data and object_bytes(emulator, prefix + "s.txt") == small
    want = {row["path"]: row for row in list_json(config)}
    listed = ossyncd("list", "-c", config)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split("\t") == ["path", "state", "size", "key", "url / error"], lines[0]
    assert len(lines) == 1 + len(want) and all(line.count("\t") == 4 for line in lines), lines
    assert "…" not in listed.stdout
    cut = subprocess.run(["cut", "-f", "1,5"], input=listed.stdout, capture_output=True, text=True, check=True)
    got = dict(line.split("\t") for line in cut.stdout.splitlines()[1:])
    assert got == {p: row["url"] for p, row in want.items()}
    assert len(got[str(f)]) > 200 and got[str(f)].endswith("columns%20%5Bv2%5D.bin"), got


def test_each_log_line_is_written_whole_in_one_write(monkeypatch):
    """A kill -9 between a line and its newline glued the next process's first line to it
    (found by the chaos suite's kills): each line, the daemon's and the libraries', is one write."""
    import structlog

    from ossyncd import log

    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.writes = []

        def write(self, s):
            self.writes.append(s)
            return super().write(s)

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    stream = Recorder()
    try:
        log.configure("info", "json", stream=stream)
        structlog.get_logger("t").info("uploaded", path="a/b.bin", size=3)
        logging.getLogger("oss2").error("a library line")
    finally:
        structlog.reset_defaults()
    assert len(stream.writes) == 2, stream.writes
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in stream.writes), stream.writes
