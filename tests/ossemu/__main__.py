"""python -m tests.ossemu --data DIR ... : run the emulator until SIGTERM/SIGINT."""

import argparse
import json
import signal
import sys
import threading

from .emulator import Emulator


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tests.ossemu", description="Local OSS + STS emulator")
    ap.add_argument("--data", required=True, help="directory for objects and uploads")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="OSS port (0 = any free port)")
    ap.add_argument("--sts-port", type=int, default=0, help="STS port (0 = any free port)")
    ap.add_argument("--bucket", action="extend", nargs="+", default=[], metavar="NAME",
                    help="bucket(s) to create (repeatable; default drop)")
    ap.add_argument("--min-duration", type=int, default=900, help="minimum AssumeRole DurationSeconds")
    ap.add_argument("--region", default="cn-hangzhou")
    ap.add_argument("--no-crc64", action="store_true",
                    help="omit x-oss-hash-crc64ecma, like servers and proxies that do not send it")
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = ap.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    emu = Emulator(args.data, buckets=args.bucket or ["drop"], host=args.host, port=args.port,
                   sts_port=args.sts_port, min_duration=args.min_duration, region=args.region,
                   verbose=args.verbose, crc64=not args.no_crc64)
    emu.start()
    sys.stdout.write(json.dumps(emu.info()) + "\n")
    sys.stdout.flush()
    while not stop.wait(1.0):
        pass
    emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
