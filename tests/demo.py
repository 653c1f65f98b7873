"""`make demo`: a local OSS + STS emulator to play with, no cloud account needed.

Data lives under ./demo-data; the bucket is `drop`; ports 9000 (OSS) and 9100 (STS) when free.
It also starts `ossyncd run` on ./drop with a config in ./demo-data/ossyncd.toml (see --help
for other folders and ports). SIGHUP, SIGINT and SIGTERM stop both.
"""

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.ossemu import Emulator

ROOT = Path(__file__).resolve().parent.parent


def _port_or_any(host, port):
    if not port:
        return 0
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return 0
    return port


def start_emulator(data_dir=ROOT / "demo-data", host="127.0.0.1", oss_port=9000, sts_port=9100):
    emu = Emulator(str(data_dir), buckets=["drop"], host=host, port=_port_or_any(host, oss_port),
                   sts_port=_port_or_any(host, sts_port))
    return emu.start()


def usage(emu, data_dir):
    return f"""\
OSS emulator  {emu.oss_url}   (bucket: drop, region: {emu.region}, data: {data_dir})
STS emulator  {emu.sts_url}   (role: {emu.role_arn})
root key      {emu.root.id} / {emu.root.secret}   (full access)
user key      {emu.user.id} / {emu.user.secret}   (may only call AssumeRole)
stats         curl {emu.oss_url}/-/stats

Try it:
    .venv/bin/python -c '
import oss2
b = oss2.Bucket(oss2.Auth("{emu.root.id}", "{emu.root.secret}"), "{emu.oss_url}", "drop")
b.put_object("hello.txt", b"hi")
print(b.get_object("hello.txt").read(), [o.key for o in oss2.ObjectIterator(b)])'

Press Ctrl-C to stop."""


def write_demo_config(emu, data_dir, drop):
    """The daemon's config: the demo drop folder, STS credentials of the emulator's upload-only role."""
    from tests.helpers import write_config
    return write_config(Path(data_dir) / "ossyncd.toml", emu, state=Path(data_dir) / "state.db",
                        watches=[{"path": str(drop), "prefix": "incoming/", "settle_seconds": 1.0}],
                        upload={"multipart_threshold": "8MiB"})


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.demo", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT / "demo-data", help="emulator data, config, state DB")
    p.add_argument("--drop", type=Path, default=ROOT / "drop", help="the folder the daemon watches")
    p.add_argument("--oss-port", type=int, default=9000, help="0: any free port")
    p.add_argument("--sts-port", type=int, default=9100, help="0: any free port")
    return p.parse_args(argv)


def stop_daemon(daemon: subprocess.Popen) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(15)
    except subprocess.TimeoutExpired:
        print(f"ossyncd (pid {daemon.pid}) did not stop within 15 s; killing it", file=sys.stderr, flush=True)
        daemon.kill()
        daemon.wait()


def main(argv=None):
    args = parse_args(argv)
    data_dir, drop = args.data.resolve(), args.drop.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    drop.mkdir(parents=True, exist_ok=True)
    # Closing the terminal (SIGHUP), Ctrl-C (SIGINT) and kill (SIGTERM) all stop everything. The
    # daemon runs in its own session, so the terminal's signals reach only us (the daemon would
    # take a SIGHUP as a reload and carry on without the emulator); we stop it.
    stop = threading.Event()
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    emu = start_emulator(data_dir / "oss", oss_port=args.oss_port, sts_port=args.sts_port)
    try:
        cfg = write_demo_config(emu, data_dir, drop)
        daemon = subprocess.Popen([sys.executable, "-m", "ossyncd", "run", "-c", str(cfg)], cwd=ROOT,
                                  env={**os.environ, "NO_PROXY": "127.0.0.1,localhost"}, start_new_session=True)
        try:
            print(usage(emu, data_dir / "oss"), flush=True)
            print(f"""
ossyncd       running on {drop} (pid {daemon.pid}), config {cfg}
              drop a file there, then:
                  .venv/bin/ossyncd status -c {cfg}
                  .venv/bin/ossyncd list -c {cfg}
""", flush=True)
            while not stop.wait(0.5) and daemon.poll() is None:
                pass
        finally:
            stop_daemon(daemon)
    finally:
        emu.stop()
    with contextlib.suppress(OSError):   # the terminal may be gone (SIGHUP)
        print("\nossyncd and the emulator stopped", flush=True)


if __name__ == "__main__":
    main()
