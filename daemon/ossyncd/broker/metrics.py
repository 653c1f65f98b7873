"""The broker's Prometheus metrics, in their own CollectorRegistry (served at /metrics; no
labels carry a token or a key):

    ossyncd_broker_issued_total{client}        counter   tokens issued by a fresh AssumeRole
    ossyncd_broker_cache_hits_total{client}    counter   answers served from the cache
    ossyncd_broker_denials_total{reason}       counter   unauthorized, disabled, throttled, bad_request
    ossyncd_broker_sts_errors_total{code}      counter   AssumeRole failures by STS error code
    ossyncd_broker_request_seconds{outcome}    histogram time to answer a credentials request
    ossyncd_broker_heartbeats_total            counter   heartbeats stored
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class BrokerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.issued = Counter("ossyncd_broker_issued", "Tokens issued by AssumeRole", ["client"], registry=r)
        self.cache_hits = Counter("ossyncd_broker_cache_hits", "Answers served from the cache", ["client"], registry=r)
        self.denials = Counter("ossyncd_broker_denials", "Requests refused, by reason", ["reason"], registry=r)
        self.sts_errors = Counter("ossyncd_broker_sts_errors", "AssumeRole failures by STS error code", ["code"],
                                  registry=r)
        self.latency = Histogram("ossyncd_broker_request_seconds", "Time to answer a credentials request",
                                 ["outcome"], buckets=BUCKETS, registry=r)
        self.heartbeats = Counter("ossyncd_broker_heartbeats", "Heartbeats stored", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
