"""The broker against the emulator's STS: tokens per second served from the cache, and the
latency of a cache miss (one AssumeRole through the broker) against the peer, the same
AssumeRole called directly with aliyun-python-sdk-sts.

The emulator and the broker run as subprocesses. OSSYNCD_BENCH_HITS (default 3000) cached
requests from OSSYNCD_BENCH_THREADS (default 8) threads, each with a keep-alive session;
OSSYNCD_BENCH_MISSES (default 200) clients registered and asked once each (every request a
miss), one at a time; as many direct AssumeRole calls.
"""

import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import requests

from tests.bench.bench_put import start_emulator
from tests.broker_helpers import Broker


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def _emu(info):
    return SimpleNamespace(info=lambda: info, role_arn=info["role_arn"], sts_url=info["sts"], oss_url=info["oss"],
                           region=info["region"])


def _register(broker, names):
    """add-client for many names in one process (the CLI costs ~0.5 s a start)."""
    from ossyncd.broker.registry import Registry
    reg = Registry(broker.db)
    return {n: reg.add(n, "drop", [f"{n}/"], None, None) for n in names}


def cached(broker, token, total, threads):
    done = []
    def worker(n):
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {token}"
        for _ in range(n):
            r = s.get(f"{broker.url}/v1/credentials", timeout=30)
            assert r.status_code == 200, r.text
        done.append(n)
    per = total // threads
    ts = [threading.Thread(target=worker, args=(per,)) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def misses(broker, tokens):
    s = requests.Session()
    lat = []
    for token in tokens.values():
        t0 = time.perf_counter()
        r = s.get(f"{broker.url}/v1/credentials", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        lat.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
    return lat


def direct(info, n):
    from aliyunsdkcore.client import AcsClient
    from aliyunsdksts.request.v20150401.AssumeRoleRequest import AssumeRoleRequest
    client = AcsClient(info["user"]["id"], info["user"]["secret"], info["region"], auto_retry=False)
    lat = []
    for i in range(n):
        req = AssumeRoleRequest()
        req.set_endpoint(info["sts"])
        req.set_RoleArn(info["role_arn"])
        req.set_RoleSessionName(f"direct{i}")
        req.set_DurationSeconds(900)
        t0 = time.perf_counter()
        json.loads(client.do_action_with_exception(req))
        lat.append(time.perf_counter() - t0)
    return lat


def main():
    hits = int(os.environ.get("OSSYNCD_BENCH_HITS", "3000"))
    threads = int(os.environ.get("OSSYNCD_BENCH_THREADS", "8"))
    nmiss = int(os.environ.get("OSSYNCD_BENCH_MISSES", "200"))
    with tempfile.TemporaryDirectory(prefix="ossyncd-bench-broker-") as tmp:
        tmp = Path(tmp)
        proc, info = start_emulator(tmp / "emu")
        broker = Broker(tmp, _emu(info), broker={"client_rate_limit": 1e6, "rate_limit": 1e6})
        try:
            broker.start()
            tokens = _register(broker, ["hit"] + [f"miss{i}" for i in range(nmiss)])
            hit = tokens.pop("hit")
            requests.get(f"{broker.url}/v1/credentials", headers={"Authorization": f"Bearer {hit}"}, timeout=30)
            rate = cached(broker, hit, hits, threads)
            miss = misses(broker, tokens)
            peer = direct(info, nmiss)
        finally:
            broker.stop()
            proc.terminate()
            proc.wait()
    print(f"cache hits: {rate:.0f} tokens/s ({hits} requests, {threads} threads, keep-alive)")
    print(f"cache miss through the broker: p50 {statistics.median(miss) * 1000:.1f} ms, "
          f"p99 {pct(miss, 99) * 1000:.1f} ms ({len(miss)} clients)")
    print(f"direct AssumeRole (peer):      p50 {statistics.median(peer) * 1000:.1f} ms, "
          f"p99 {pct(peer, 99) * 1000:.1f} ms")
    print(f"broker miss / direct, p99: {pct(miss, 99) / pct(peer, 99):.2f}x")


if __name__ == "__main__":
    main()
