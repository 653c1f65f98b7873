"""The shipped unit run by a real systemd (PID 1 of a systemd-nspawn container), installed by
executing README.md's "Running under systemd" steps as written. `make test-systemd`.

The tests share one booted container and one emulator and run in file order: each one
leaves the service running with the base config. See docs/systemd-test.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.helpers import MiB, fast_upload, object_bytes, random_file, sts_credentials, wait_until, write_config
from tests.systemd import container as ct

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]

README = ct.ROOT / "README.md"
CONF = "/etc/ossyncd/ossyncd.toml"
DROP = "/srv/drop"
SRC = "/usr/src/ossyncd"      # the checkout, copied in: the README's steps run from here
P = "in/"                     # the drop folder's key prefix


def readme_steps() -> list[tuple[str, str]]:
    """(title, script) for each numbered step of the fenced sh block under "Running under systemd"."""
    text = README.read_text()
    section = text.split("\n## Running under systemd\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```sh\n(.*?)^```$", section, re.S | re.M)
    assert block, "README: no ```sh block under 'Running under systemd'"
    steps = re.split(r"^(# \d+\..*)$", block.group(1), flags=re.M)
    assert steps[0].strip() == "", steps[0]
    return [(steps[i].strip(), steps[i + 1]) for i in range(1, len(steps), 2)]


def readme_jq_command() -> str:
    section = README.read_text().split("\n## Running under systemd\n", 1)[1]
    m = re.search(r"\(`(journalctl -u ossyncd -o cat[^`]*\| jq [^`]*)`", section)
    assert m, "README: the journalctl | jq example is gone"
    return m.group(1)


# ------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    from tests.ossemu import Emulator

    e = Emulator(str(tmp_path_factory.mktemp("ossemu")), buckets=["drop"], min_duration=1)
    e.start()
    yield e
    e.stop()


def _cannot_boot(reason):
    """Skip where the machine cannot boot a container; CI sets OSSYNCD_REQUIRE_SYSTEMD=1, since its
    machines can, so there the same reason is a failure."""
    print(f"\nSKIP test-systemd: {reason}")
    if os.environ.get("OSSYNCD_REQUIRE_SYSTEMD") == "1":
        pytest.fail(f"cannot boot a container, and OSSYNCD_REQUIRE_SYSTEMD=1: {reason}")
    pytest.skip(f"cannot boot a container: {reason}")


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    try:
        ct.check_machine()
    except ct.Unavailable as e:
        _cannot_boot(e)
    base = ct.rootfs()
    work = tmp_path_factory.mktemp("nspawn")
    tree = work / "rootfs"
    t0 = time.monotonic()
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(tree)], check=True, timeout=300)
    ct.copy_checkout(tree / SRC.lstrip("/"))
    ct.wheelhouse(tree / "wheelhouse", tree / SRC.lstrip("/"))
    print(f"\nrootfs copy + wheelhouse: {time.monotonic() - t0:.1f} s")
    c = ct.Container(tree, work / "nspawn.log")
    t0 = time.monotonic()
    try:
        c.boot()
    except ct.Unavailable as e:
        c.shutdown()
        _cannot_boot(e)
    print(f"boot to multi-user: {time.monotonic() - t0:.1f} s")
    yield c
    c.shutdown()
    shutil.rmtree(tree, ignore_errors=True)


def base_config(emu, watches=None, *, credentials: dict | None = None, oss: dict | None = None, **upload) -> str:
    """The test's edit of /etc/ossyncd/ossyncd.toml: the emulator, STS with the key pair from
    credentials.env (unless `credentials` says otherwise), state in the StateDirectory."""
    creds = credentials
    if creds is None:
        creds = sts_credentials(emu)
        del creds["access_key_id"], creds["access_key_secret"]
    watches = watches if watches is not None else [{"path": DROP, "prefix": P, "settle_seconds": 0.5}]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / "ossyncd.toml"
        write_config(tmp, emu, state=Path("/var/lib/ossyncd/state.db"), credentials=creds, watches=watches, oss=oss,
                     upload=fast_upload(part_size="1MiB", multipart_threshold=1 * MiB, parallel_parts=4, **upload),
                     daemon={"rescan_interval": 5.0})
        return tmp.read_text()


def put_config(c: ct.Container, text: str) -> None:
    """Rewrite the config in place (mode and group stay as the README's install set them)."""
    c.sh(f"cat > {CONF}", input=text)


@pytest.fixture(scope="module")
def service(machine, emu):
    c = machine
    steps = readme_steps()
    assert [t.split(".")[0] for t, _ in steps] == ["# 1", "# 2", "# 3", "# 4", "# 5"], [t for t, _ in steps]
    c.sh(f"install -d -m 0755 {DROP}")       # the operator's drop folder exists before step 2
    user = emu.info()["user"]
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheelhouse"}   # pip in the container: the wheelhouse only
    timings = {}
    for title, script in steps:
        if title.startswith("# 3."):
            # the operator's values for the README's placeholders
            script, n = re.subn(r"OSSYNCD_ACCESS_KEY_ID=\.\.\.", f"OSSYNCD_ACCESS_KEY_ID={user['id']}", script)
            script, m = re.subn(r"OSSYNCD_ACCESS_KEY_SECRET=\.\.\.", f"OSSYNCD_ACCESS_KEY_SECRET={user['secret']}",
                                script)
            assert n == m == 1, script
        if title.startswith("# 5."):
            put_config(c, base_config(emu))     # step 3 says "then edit it"
        t0 = time.monotonic()
        r = c.sh("set -ex\n" + script, cwd=SRC, env=env, timeout=600, check=False)
        timings[title] = time.monotonic() - t0
        assert r.returncode == 0, f"README step {title!r} failed as written:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    print("README steps:", {k: round(v, 1) for k, v in timings.items()})
    return c


def show(c: ct.Container, *props: str) -> dict[str, str]:
    out = c.sh(f"systemctl show ossyncd -p {','.join(props)}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wall(stamp: str) -> float:
    """A `systemctl show --timestamp=us+utc` value ("Tue 2026-12-01 23:42:26.641981 UTC") as epoch seconds."""
    return datetime.strptime(stamp.strip(), "%a %Y-%m-%d %H:%M:%S.%f UTC").replace(tzinfo=timezone.utc).timestamp()


def seconds(span: str) -> float:
    """A systemd time span as `systemctl show` prints it ("30s", "1min 30s", "500ms")."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|min|h)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(float(n) * units[u] for n, u in parts)


def journal(c: ct.Container, cursor: str = "", fmt: str = "cat") -> str:
    after = f"--after-cursor='{cursor}'" if cursor else ""
    return c.sh(f"journalctl -u ossyncd -o {fmt} --no-pager {after}").stdout


def cursor(c: ct.Container) -> str:
    out = c.sh("journalctl -n 0 --show-cursor --no-pager").stdout
    return out.strip().rsplit("-- cursor: ", 1)[-1]


def daemon_events(c: ct.Container, since: str = "") -> list[dict]:
    """The daemon's own lines (_SYSTEMD_UNIT), each a JSON object."""
    after = f"--after-cursor='{since}'" if since else ""
    out = c.sh(f"journalctl _SYSTEMD_UNIT=ossyncd.service -o cat --no-pager {after}").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wait_object(emu, key: str, timeout: float = 60):
    wait_until(lambda: any(o["key"] == key for o in emu.objects("drop")), timeout, interval=0.2,
               what=f"object {key}")


def active(c: ct.Container) -> bool:
    return c.sh("systemctl is-active ossyncd", check=False).stdout.strip() == "active"


# ------------------------------------------------------------------------ tests

def test_readme_install_reaches_active_only_after_ready_with_status(service):
    c = service
    p = show(c, "ActiveState", "SubState", "Type", "StatusText", "UnitFileState")
    assert (p["ActiveState"], p["SubState"], p["Type"], p["UnitFileState"]) == ("active", "running", "notify",
                                                                                  "enabled"), p
    # Type=notify: active only once the daemon said READY=1, which it sends right after logging
    # "started" (the line's own timestamp: journald may receive it after systemd took READY)
    started = [e for e in daemon_events(c) if e["event"] == "started"]
    assert len(started) == 1, started
    t_started = datetime.fromisoformat(started[0]["timestamp"].replace("Z", "+00:00")).timestamp()
    exec_at, active_at = (wall(c.sh(f"systemctl show ossyncd --timestamp=us+utc -P {k}").stdout)
                          for k in ("ExecMainStartTimestamp", "ActiveEnterTimestamp"))
    assert exec_at < t_started <= active_at, (exec_at, t_started, active_at)
    startup = active_at - exec_at
    print(f"exec -> READY (active): {startup:.2f} s")
    assert re.fullmatch(r"queued \d+ / uploading \d+ / done \d+ / failed \d+, [\d.]+ MiB/s", p["StatusText"]), p
    status = c.sh("systemctl status ossyncd --no-pager", check=False).stdout
    assert re.search(r"^\s+Status: \"queued \d+ / uploading \d+ / done \d+ / failed \d+, [\d.]+ MiB/s\"$", status,
                     re.M), status
    assert "Active: active (running)" in status, status
    # step 4's drop-in is where systemd-sysctl reads it (the kernel's limits are the host's)
    assert "fs.inotify.max_user_watches = 524288" in c.sh("/lib/systemd/systemd-sysctl --cat-config").stdout


def test_dropped_files_byte_equal_and_journal_json(service, emu):
    c = service
    files = {P + "hello.txt": random_file(c.path(f"{DROP}/hello.txt"), 5000, seed=1),
             P + "sub/big.bin": random_file(c.path(f"{DROP}/sub/big.bin"), 3 * MiB + 17, seed=2)}
    for key in files:
        wait_object(emu, key)
    for key, data in files.items():
        assert object_bytes(emu, key) == data, key
    wait_until(lambda: len([e for e in daemon_events(c) if e["event"] == "uploaded"]) >= 2, 15, what="uploaded lines")
    # every line of the daemon in the journal is JSON (daemon_events parses each), one "uploaded" per file
    uploaded = [e for e in daemon_events(c) if e["event"] == "uploaded"]
    assert sorted(e["key"] for e in uploaded) == sorted(files), uploaded
    assert {e["key"]: e["mode"] for e in uploaded} == {P + "hello.txt": "simple", P + "sub/big.bin": "multipart"}
    # the README's own example, as written
    r = c.sh(readme_jq_command() + " | jq -s 'map(.key)'", check=False)
    assert r.returncode == 0 and r.stderr == "", f"README's journalctl | jq example fails: {r.stderr}"
    assert sorted(json.loads(r.stdout)) == sorted(files)
    everything = journal(c, fmt="json")
    user, root = emu.info()["user"], emu.info()["root"]
    for secret in (user["secret"], root["secret"]):
        assert secret not in everything
    assert "SecurityToken" not in everything and "security_token=" not in everything


def test_ossyncd_status_as_the_service_user(service):
    c = service
    r = c.sh(f"sudo -u ossyncd ossyncd status -c {CONF} --json", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    st = json.loads(r.stdout)
    assert st["counts"].get("done") == 2, st
    # and the DB stays the daemon's: no root-owned side files
    owners = c.sh("stat -c '%U %a %n' /var/lib/ossyncd/state.db*").stdout.split("\n")
    assert all(line.startswith("ossyncd ") for line in owners if line), owners


def main_pid(c: ct.Container) -> int:
    return int(show(c, "MainPID")["MainPID"])


def wait_event(c: ct.Container, since: str, event: str, timeout: float = 30, **fields) -> dict:
    def found():
        for e in daemon_events(c, since):
            if e.get("event") == event and all(str(v) in str(e.get(k)) for k, v in fields.items()):
                return e
        return None
    return wait_until(found, timeout, interval=0.3, what=f"journal event {event!r} {fields}")


def restart_with(c: ct.Container, config: str) -> None:
    put_config(c, config)
    since = cursor(c)
    r = c.sh("systemctl restart ossyncd", check=False)
    assert r.returncode == 0 and active(c), f"restart failed:\n{r.stderr}\n{journal(c, since)[-3000:]}"


def test_reload_adds_a_watch_live_and_rejects_a_broken_config(service, emu):
    c = service
    pid = main_pid(c)
    c.sh("install -d -m 0755 /srv/drop2")
    two = [{"path": DROP, "prefix": P, "settle_seconds": 0.5}, {"path": "/srv/drop2", "prefix": "second/",
                                                                 "settle_seconds": 0.5}]
    put_config(c, base_config(emu, two))
    since = cursor(c)
    c.sh("systemctl reload ossyncd")
    data = random_file(c.path("/srv/drop2/new.txt"), 7000, seed=3)
    wait_object(emu, "second/new.txt")
    assert object_bytes(emu, "second/new.txt") == data
    assert main_pid(c) == pid and active(c)

    # a broken config: rejected, naming the key; the running config stays in force
    put_config(c, base_config(emu, two).replace('part_size = "1MiB"', 'part_size = "huge"'))
    since = cursor(c)
    c.sh("systemctl reload ossyncd")
    e = wait_event(c, since, "reload rejected; the running config stays in force")
    assert "upload.part_size" in e["error"], e
    data = random_file(c.path("/srv/drop2/after.txt"), 3000, seed=4)
    wait_object(emu, "second/after.txt")
    assert object_bytes(emu, "second/after.txt") == data
    assert main_pid(c) == pid and active(c)
    put_config(c, base_config(emu))
    c.sh("systemctl reload ossyncd")


def test_watchdog_restarts_a_stopped_daemon_which_resumes(service, emu):
    c = service
    p = show(c, "WatchdogUSec", "RestartUSec", "NRestarts")
    watchdog, restart_sec = seconds(p["WatchdogUSec"]), seconds(p["RestartUSec"])
    assert watchdog == 30 and restart_sec == 5, p          # the shipped unit's values
    before = emu.stats()["requests"]
    emu.set_faults([{"op": "UploadPart", "delay_ms": 400}])
    data = random_file(c.path(f"{DROP}/stuck.bin"), 8 * MiB, seed=5)
    wait_until(lambda: emu.stats()["requests"].get("UploadPart", 0) - before.get("UploadPart", 0) >= 3, 60,
               what="parts in flight")
    pid = main_pid(c)
    since = cursor(c)
    t0 = time.monotonic()
    c.sh(f"kill -STOP {pid}")
    wait_until(lambda: main_pid(c) not in (0, pid) and active(c), watchdog + restart_sec + 30, interval=0.5,
               what="a new main process after the watchdog")
    took = time.monotonic() - t0
    print(f"SIGSTOP -> watchdog restart -> active again: {took:.1f} s (WatchdogSec {watchdog:.0f} + RestartSec "
          f"{restart_sec:.0f})")
    # the last ping came 0..WatchdogSec/2 before the SIGSTOP; then RestartSec and a start
    assert watchdog / 2 + restart_sec <= took <= watchdog + restart_sec + 15, took
    assert int(show(c, "NRestarts")["NRestarts"]) == int(p["NRestarts"]) + 1
    assert "Watchdog timeout" in journal(c, since)
    emu.clear_faults()
    wait_object(emu, P + "stuck.bin")
    assert object_bytes(emu, P + "stuck.bin") == data
    after = emu.stats()["requests"]
    assert after.get("InitiateMultipartUpload", 0) - before.get("InitiateMultipartUpload", 0) == 1   # resumed
    e = wait_event(c, since, "uploaded", key=P + "stuck.bin")
    assert 0 < e["parts"] < 8, e                             # only the parts not recorded before the stop


def test_stop_during_multipart_is_clean_and_the_next_start_resumes(service, emu):
    c = service
    timeout_stop = seconds(show(c, "TimeoutStopUSec")["TimeoutStopUSec"])
    assert timeout_stop == 30
    s0 = emu.stats()
    emu.set_faults([{"op": "UploadPart", "delay_ms": 500}])
    data = random_file(c.path(f"{DROP}/stop.bin"), 24 * MiB, seed=6)
    wait_until(lambda: emu.stats()["requests"].get("UploadPart", 0) - s0["requests"].get("UploadPart", 0) >= 6, 60,
               what="parts in flight")
    since = cursor(c)
    t0 = time.monotonic()
    c.sh("systemctl stop ossyncd")
    took = time.monotonic() - t0
    print(f"systemctl stop with a multipart upload in flight: {took:.2f} s (TimeoutStopSec {timeout_stop:.0f})")
    assert took < timeout_stop
    p = show(c, "ActiveState", "Result", "ExecMainStatus")
    assert (p["ActiveState"], p["Result"], p["ExecMainStatus"]) == ("inactive", "success", "0"), p
    text = journal(c, since)
    assert "SIGKILL" not in text and "Killing process" not in text and "timed out" not in text, text
    assert emu.stats()["requests"].get("CompleteMultipartUpload", 0) == s0["requests"].get("CompleteMultipartUpload", 0)
    emu.clear_faults()
    c.sh("systemctl start ossyncd")
    wait_object(emu, P + "stop.bin", timeout=90)
    assert object_bytes(emu, P + "stop.bin") == data
    s1 = emu.stats()
    sent = s1["bytes_received"] - s0["bytes_received"]
    print(f"bytes sent for a 24 MiB file across the stop: {sent / MiB:.2f} MiB")
    assert sent <= len(data) + 4 * MiB, sent                # at most the parts in flight at the stop, again
    assert s1["requests"]["InitiateMultipartUpload"] - s0["requests"].get("InitiateMultipartUpload", 0) == 1


def in_service(c: ct.Container, script: str, user: str = "ossyncd") -> subprocess.CompletedProcess:
    """`script` in the running service's mount namespace, as `user`: what the daemon itself can see and do."""
    who = f"-S $(id -u {user}) -G $(id -g {user})" if user != "root" else ""
    return c.sh(f"nsenter -t {main_pid(c)} -m {who} -- /bin/sh -c '{script}'", check=False)


def test_hardening_is_in_force(service):
    c = service
    # read-only mounts: even root in the service's namespace cannot write there
    for path in ("/etc/ossyncd/probe", "/opt/ossyncd/probe", "/usr/local/bin/probe", f"{DROP}/probe", "/var/probe"):
        r = in_service(c, f"touch {path}", user="root")
        assert r.returncode != 0 and "Read-only file system" in r.stderr, (path, r.stderr)
    for path in ("/var/lib/ossyncd/probe", "/run/ossyncd/probe", "/tmp/probe"):
        r = in_service(c, f"touch {path} && rm {path}")
        assert r.returncode == 0, (path, r.stderr)
    # PrivateTmp: the service's /tmp is not the system's
    assert not c.path("/tmp/probe").exists()
    c.sh("install -d -m 0755 /home/alice && echo hi > /home/alice/photo.jpg")
    r = in_service(c, "ls -A /home", user="root")      # even root in its namespace sees an empty /home
    assert r.returncode == 0 and r.stdout.strip() == "", r
    assert in_service(c, "cat /home/alice/photo.jpg").returncode != 0
    st = c.sh("stat -c '%U %G %a' /var/lib/ossyncd/state.db /var/lib/ossyncd").stdout.split("\n")
    assert st[:2] == ["ossyncd ossyncd 600", "ossyncd ossyncd 700"], st


def readme_dropin() -> str:
    section = README.read_text().split("\n## Running under systemd\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"^```ini\n(.*?)^```$", section, re.S | re.M)
    assert m, "README: the drop-in example is gone"
    return m.group(1)


def test_after_upload_delete_needs_the_readme_dropin(service, emu):
    c = service
    delete = [{"path": DROP, "prefix": P, "settle_seconds": 0.5, "after_upload": "delete"}]
    # the README's setfacl for delete/move: rwX
    c.sh(f"setfacl -R -m u:ossyncd:rwX -m d:u:ossyncd:rwX {DROP}")
    since = cursor(c)
    restart_with(c, base_config(emu, delete))
    data = random_file(c.path(f"{DROP}/del1.txt"), 4000, seed=7)
    wait_object(emu, P + "del1.txt")
    assert object_bytes(emu, P + "del1.txt") == data
    e = wait_event(c, since, "after_upload failed; the source stays", path=f"{DROP}/del1.txt")
    assert e["error"] == "Read-only file system" and e["action"] == "delete", e
    assert c.path(f"{DROP}/del1.txt").exists()

    # the README's drop-in, as written (it names /srv/done and a group `cameras`: an operator has them)
    c.sh("groupadd --system cameras && install -d -m 0755 /srv/done && install -d /etc/systemd/system/ossyncd.service.d")
    c.sh("cat > /etc/systemd/system/ossyncd.service.d/override.conf", input=readme_dropin())
    c.sh("systemctl daemon-reload")
    since = cursor(c)
    c.sh("systemctl restart ossyncd")
    data = random_file(c.path(f"{DROP}/del2.txt"), 4000, seed=8)
    wait_object(emu, P + "del2.txt")
    assert object_bytes(emu, P + "del2.txt") == data
    wait_event(c, since, "source deleted after verified upload", path=f"{DROP}/del2.txt")
    assert not c.path(f"{DROP}/del2.txt").exists()
    # back to the base service for the tests after this one
    c.sh("rm -r /etc/systemd/system/ossyncd.service.d && systemctl daemon-reload")
    restart_with(c, base_config(emu))


def test_restart_on_failure_hits_the_start_limit_and_the_journal_names_the_key(service, emu):
    c = service
    # a config error (exit 2) is not restarted: RestartPreventExitStatus=2
    since = cursor(c)
    put_config(c, base_config(emu).replace('part_size = "1MiB"', 'part_size = "huge"'))
    assert c.sh("systemctl restart ossyncd", check=False).returncode != 0
    p = show(c, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert (p["ActiveState"], p["Result"], p["ExecMainStatus"], p["NRestarts"]) == ("failed", "exit-code", "2", "0"), p
    text = journal(c, since)
    assert "upload.part_size" in text and "Scheduled restart job" not in text, text

    # a start that fails with exit 1 is retried every RestartSec until StartLimitBurst, then stays failed
    c.sh("systemctl reset-failed ossyncd")
    since = cursor(c)
    t0 = time.monotonic()
    put_config(c, base_config(emu).replace('"/var/lib/ossyncd/state.db"', '"/var/cache/state.db"'))
    c.sh("systemctl start ossyncd", check=False)
    wait_until(lambda: "Start request repeated too quickly" in journal(c, since), 120, interval=1,
               what="the start limit")
    print(f"StartLimitBurst failed starts to the start limit: {time.monotonic() - t0:.1f} s")
    text = journal(c, since)
    p = show(c, "ActiveState", "NRestarts", "StartLimitBurst")
    burst = int(p["StartLimitBurst"])
    # StartLimitBurst starts ran (the manual one resets NRestarts), the next restart was refused
    assert (p["ActiveState"], burst, int(p["NRestarts"])) == ("failed", 5, burst), p
    # each start's line names the file, the cause and the key to change (JSON, and the stderr line)
    line = "state DB /var/cache/state.db: cannot open it for writing: read-only file system on /var/cache"
    assert text.count(line) == 2 * burst, text
    assert text.count("or change state.path") == 2 * burst, text
    assert text.count("Scheduled restart job") == burst, text
    c.sh("systemctl reset-failed ossyncd")
    restart_with(c, base_config(emu))


# ------------------------------------------------------------------------ the broker's unit

BROKER_UNIT = ct.ROOT / "systemd" / "ossyncd-broker.service"
BROKER_CONF = "/etc/ossyncd/broker.toml"


def broker_install_steps() -> list[str]:
    """The commands of the broker unit's "# Install:" comment, as written (a note in brackets is not one)."""
    header = BROKER_UNIT.read_text().split("# Install:\n", 1)[1].split("\n#\n", 1)[0]
    lines = [line.removeprefix("#").strip() for line in header.splitlines()]
    return [line.split(" # ", 1)[0].strip() for line in lines if line and not line.startswith("(")]


def edit_broker_example(text: str, emu, port: int) -> str:
    """The operator's edit of config/broker.example.toml: each key changed where the example has it."""
    values = {"listen": f"127.0.0.1:{port}", "role_arn": emu.role_arn, "max_duration": 900, "source": "static",
              "sts_endpoint": emu.sts_url, "sts_region": emu.region, "endpoint": emu.oss_url, "bucket": "drop",
              "region": emu.region}
    for key, value in values.items():
        text, n = re.subn(rf"^{key} = (\"[^\"]*\"|\d+)", f"{key} = {json.dumps(value)}", text, flags=re.M)
        assert n == 1, f"config/broker.example.toml: no single {key!r} line to edit"
    return text


def test_broker_unit_installed_as_its_header_says_serves_a_registered_host(service, emu):
    """The broker's unit, installed by its own "# Install:" lines, hands STS tokens to the daemon's
    service on the same machine, whose config is just the broker URL and the token add-client printed."""
    from tests.broker_helpers import free_port

    c = service
    steps = broker_install_steps()
    assert [s.split()[0] for s in steps] == ["useradd", "install", "install", "systemctl", "ossyncd"], steps
    useradd, unit, config, enable, add_client = steps
    for step in (useradd, unit, config):
        c.sh("set -ex\n" + step, cwd=SRC)
    # "then edit": the example with this machine's values; the broker's key pair in broker.env, as
    # the unit's comment says (source = "static", the keys left out of broker.toml)
    example = c.sh(f"cat {BROKER_CONF}").stdout
    c.sh(f"cat > {BROKER_CONF}", input=edit_broker_example(example, emu, free_port()))
    user = emu.info()["user"]
    c.sh("install -m 0600 /dev/null /etc/ossyncd/broker.env && cat > /etc/ossyncd/broker.env",
         input=f"OSSYNCD_ACCESS_KEY_ID={user['id']}\nOSSYNCD_ACCESS_KEY_SECRET={user['secret']}\n")
    r = c.sh("set -ex\n" + enable, cwd=SRC, check=False)
    status = c.sh("systemctl status ossyncd-broker --no-pager; journalctl -u ossyncd-broker --no-pager -o cat",
                  check=False).stdout
    assert r.returncode == 0, f"{enable!r} failed:\n{r.stderr}\n{status[-3000:]}"
    assert c.sh("systemctl is-active ossyncd-broker", check=False).stdout.strip() == "active", status[-3000:]
    assert "serving on http://127.0.0.1:" in status, status[-3000:]
    url = re.search(r"serving on (http://127\.0\.0\.1:\d+)", status).group(1)

    # the registry command, run as the service user as the unit's note says; it prints the token
    token = c.sh("set -e\nrunuser -u ossyncd-broker -- " + add_client, cwd=SRC).stdout.strip()
    assert re.fullmatch(r"\S{20,}", token), token
    prefix = add_client.split("--prefix ", 1)[1].split()[0]
    assert prefix == "site1/cam-01/", add_client

    host = {"source": "broker", "broker_url": f"{url}/v1/credentials", "broker_token": token,
            "retry_backoff": 0.2, "retry_backoff_max": 1.0}
    try:
        restart_with(c, base_config(emu, [{"path": DROP, "prefix": prefix, "settle_seconds": 0.5}], credentials=host,
                                    oss={"endpoint": None, "bucket": None, "region": None}))
        data = random_file(c.path(f"{DROP}/fleet.bin"), 3 * MiB + 11, seed=12)   # multipart under a broker token
        wait_object(emu, f"{prefix}fleet.bin")
        assert object_bytes(emu, f"{prefix}fleet.bin") == data

        audit = [json.loads(line) for line in c.path("/var/lib/ossyncd-broker/audit.jsonl").read_text().splitlines()]
        mine = [a for a in audit if a["client"] == "cam-01"]
        assert mine and all(a["decision"] == "allow" for a in mine), audit
        assert token not in c.path("/var/lib/ossyncd-broker/audit.jsonl").read_text()
        # the host's heartbeat reaches the broker's registry: `broker status` as the service user lists it
        def beat():
            out = c.sh(f"runuser -u ossyncd-broker -- ossyncd broker status --json -c {BROKER_CONF}").stdout
            cam = next(x for x in json.loads(out)["clients"] if x["name"] == "cam-01")
            return cam["hosts"] or None
        hosts = wait_until(beat, 60, interval=0.5, what="a heartbeat from the host in `broker status`")
        hostname = c.sh("hostname").stdout.strip()
        assert [h["host"] for h in hosts] == [hostname] and hosts[0]["credential_expiry"], hosts
    finally:
        restart_with(c, base_config(emu))
