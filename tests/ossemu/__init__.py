"""Local OSS + STS emulator for tests, benchmarks and `make demo`.

Strict enough that passing tests mean something: V1/V4 signatures (headers and presigned
URLs), STS tokens with expiry and inline policies, exact oss2 wire formats, CRC64 on every
write, multipart rules (InvalidPart, InvalidPartOrder, EntityTooSmall), fault injection.

CLI:  python -m tests.ossemu --data DIR [--host H] [--port 0] [--sts-port 0] [--bucket NAME ...]
                             [--min-duration S] [--region R]
prints one JSON line {"oss", "sts", "region", "proxy", "oss_endpoint", "sts_endpoint", "root", "user",
"role_arn"} and serves until SIGTERM/SIGINT.

In-process:  from tests.ossemu import Emulator
             with Emulator(tmpdir, buckets=["drop"], min_duration=1) as emu: ...

As an HTTP forward proxy (HTTP_PROXY=<oss url>) it also serves the real endpoint names
(http://oss-<region>.aliyuncs.com, http://sts.<region>.aliyuncs.com) in virtual-hosted style.

Modules: emulator (the Emulator object), server (HTTP, body streaming, forward-proxy requests,
control endpoints under /-/), hosts (host/path addressing, SecondLevelDomainForbidden), ops (routing
and the op table), objects / listings (one function per OSS operation), common (Response, query
parsing), storage (disk layout, multipart rules), auth (signatures, principals, policy), sts
(AssumeRole), faults (fault rules, counters), xmlfmt (XML/dates), errors.
"""

from .emulator import Emulator

__all__ = ["Emulator"]
