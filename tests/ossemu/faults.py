"""Fault rules and request statistics (both thread-safe).

A fault rule is a dict:

    {"op": "UploadPart",          # operation name, or "*" for any (AssumeRole applies on the STS port)
     "probability": 1.0,          # default 1, drawn from the rule's own RNG (seeded by "seed", default 0)
     "count": 5,                  # fire at most this many times; default unlimited
     "skip": 0,                   # let this many matching requests pass before the rule can fire
     "key_prefix": "incoming/",   # only objects whose key starts with this
     # actions, combinable:
     "status": 503, "code": "ServiceUnavailable", "message": "...",   # error reply (body drained first)
     "delay_ms": 500,             # sleep before responding
     "reset_after_bytes": 65536,  # read that many body bytes, then shutdown+close, no response
     "flip_bit": true,            # flip one bit of the body (at "flip_offset", default the middle)
                                  # before it is stored and checksummed
     "drop_response": true,       # perform the operation, then close without a response
     "strip_headers": ["ETag"],   # perform the operation, answer without these headers (a proxy)
     "retry_after": 2,            # with "status": a Retry-After header (seconds) on the error reply
     "bad_error_body": true,      # with "status": an error body that is not XML (a proxy's HTML page cut short)
     "truncate_body": 10,         # perform the operation, announce the whole response body in
                                  # Content-Length, send only this many bytes of it, then close
     "crc64": "wrong",            # perform the operation; its x-oss-hash-crc64ecma (header and XML) is
                                  # "wrong" (off by one) or "missing"
     "refuse": true,              # close at once: nothing read, nothing performed, no response
                                  # (what a client sees as a refused or reset connection)
    }

A delay longer than the client's read timeout is a stall. STS (AssumeRole, AssumeRoleWithOIDC)
applies status, retry_after, delay_ms, reset_after_bytes, bad_error_body and refuse; the others are
OSS-only.

The first rule (in list order) that matches and fires is applied; at most one per request.
"""

import random
import threading
from collections import defaultdict

RULE_FIELDS = {"op", "probability", "count", "skip", "key_prefix", "seed", "status", "code", "message",
               "delay_ms", "reset_after_bytes", "flip_bit", "flip_offset", "drop_response", "retry_after",
               "bad_error_body", "truncate_body", "crc64", "refuse", "strip_headers"}
ACTIONS = {"status", "delay_ms", "reset_after_bytes", "flip_bit", "drop_response", "truncate_body", "crc64",
           "refuse", "strip_headers"}
NEED_STATUS = ("retry_after", "bad_error_body")   # they shape an error reply
CRC64_FAULTS = ("wrong", "missing")


class Fault:
    """The actions of one fired rule."""

    def __init__(self, rule, stopping=None):
        self.stopping = stopping or threading.Event()
        self.status = rule.get("status")
        self.code = rule.get("code") or ("ServiceUnavailable" if self.status else None)
        self.message = rule.get("message") or "Injected fault."
        self.delay = (rule.get("delay_ms") or 0) / 1000.0
        self.reset_after = rule.get("reset_after_bytes")
        self.flip_bit = bool(rule.get("flip_bit"))
        self.flip_offset = rule.get("flip_offset")
        self.drop_response = bool(rule.get("drop_response"))
        self.strip_headers = {h.lower() for h in rule.get("strip_headers") or ()}
        self.retry_after = rule.get("retry_after")
        self.bad_error_body = bool(rule.get("bad_error_body"))
        self.truncate_body = rule.get("truncate_body")
        self.crc64 = rule.get("crc64")
        self.refuse = bool(rule.get("refuse"))

    def sleep(self):
        if self.delay > 0:   # cut short when the emulator stops, so a long delay does not hold it up
            self.stopping.wait(self.delay)


class FaultEngine:
    def __init__(self):
        self._lock = threading.Lock()
        self._rules = []
        self.stopping = threading.Event()   # set by Emulator.stop

    @staticmethod
    def validate(rule):
        if not isinstance(rule, dict):
            raise ValueError("a fault rule must be a JSON object")
        unknown = set(rule) - RULE_FIELDS
        if unknown:
            raise ValueError(f"unknown fault rule field(s): {sorted(unknown)}")
        if not rule.get("op"):
            raise ValueError("a fault rule needs 'op'")
        if not ACTIONS & set(rule):
            raise ValueError(f"a fault rule needs an action: one of {sorted(ACTIONS)}")
        strip = rule.get("strip_headers", [])
        if not isinstance(strip, list) or not all(isinstance(h, str) for h in strip):
            raise ValueError("strip_headers must be a list of header names")
        p = rule.get("probability", 1)
        if not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError("probability must be a number in [0, 1]")
        for k in NEED_STATUS:
            if rule.get(k) and not rule.get("status"):
                raise ValueError(f"{k} shapes an error reply: it needs 'status'")
        if "crc64" in rule and rule["crc64"] not in CRC64_FAULTS:
            raise ValueError(f"crc64 must be one of {list(CRC64_FAULTS)}")
        for k in ("count", "skip", "reset_after_bytes", "delay_ms", "status", "flip_offset", "retry_after",
                  "truncate_body"):
            if k in rule and rule[k] is not None and (not isinstance(rule[k], (int, float)) or rule[k] < 0):
                raise ValueError(f"{k} must be a non-negative number")

    def set(self, rules, append=False):
        for r in rules:
            self.validate(r)
        fresh = [{"rule": dict(r), "remaining": r.get("count"), "skip": r.get("skip", 0) or 0,
                  "fired": 0, "rng": random.Random(r.get("seed", 0))} for r in rules]
        with self._lock:
            self._rules = (self._rules if append else []) + fresh

    def clear(self):
        with self._lock:
            self._rules = []

    def list(self):
        with self._lock:
            return [dict(e["rule"], remaining=e["remaining"], fired=e["fired"]) for e in self._rules]

    def pick(self, op, key=None):
        """Return a Fault for this request, or None. Consumes count/skip of the firing rule."""
        with self._lock:
            for e in self._rules:
                r = e["rule"]
                if r["op"] not in (op, "*"):
                    continue
                if r.get("key_prefix") is not None and (key is None or not key.startswith(r["key_prefix"])):
                    continue
                if e["remaining"] is not None and e["remaining"] <= 0:
                    continue
                if e["skip"] > 0:
                    e["skip"] -= 1
                    continue
                if e["rng"].random() >= r.get("probability", 1):
                    continue
                if e["remaining"] is not None:
                    e["remaining"] -= 1
                e["fired"] += 1
                return Fault(r, self.stopping)
        return None


class Stats:
    """Counters served at GET /-/stats."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        with self._lock:
            self.requests = defaultdict(int)
            self.ok = defaultdict(int)
            self.errors = defaultdict(lambda: defaultdict(int))
            self.bytes_by_op = defaultdict(int)
            self.faults = defaultdict(int)
            self.bytes_received = 0
            self.parts_received = 0
            self.sts_issued = 0
            self.uploads_initiated = 0
            self.uploads_completed = 0
            self.uploads_aborted = 0
            self.oidc_tokens = defaultdict(int)   # jti -> accepted AssumeRoleWithOIDC calls
            self.callback_headers = defaultdict(int)   # op -> requests that carried x-oss-callback
            self.callbacks = defaultdict(int)          # "op:ok" / "op:failed" -> callbacks made
            self.sessions = defaultdict(int)      # RoleSessionName -> accepted AssumeRole calls

    def request(self, op):
        with self._lock:
            self.requests[op] += 1

    def success(self, op):
        with self._lock:
            self.ok[op] += 1

    def error(self, op, code):
        with self._lock:
            self.errors[op][code] += 1

    def fault(self, op):
        with self._lock:
            self.faults[op] += 1

    def body_bytes(self, op, n):
        with self._lock:
            self.bytes_received += n
            self.bytes_by_op[op] += n

    def oidc_token(self, jti):
        with self._lock:
            self.oidc_tokens[str(jti)] += 1

    def callback_header(self, op):
        with self._lock:
            self.callback_headers[op] += 1

    def callback(self, op, outcome):
        with self._lock:
            self.callbacks[f"{op}:{outcome}"] += 1
    def session(self, name):
        with self._lock:
            self.sessions[str(name)] += 1

    def add(self, name, n=1):
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self):
        with self._lock:
            return {
                "requests": dict(self.requests),
                "ok": dict(self.ok),
                "errors": {op: dict(c) for op, c in self.errors.items()},
                "faults": dict(self.faults),
                "bytes_received": self.bytes_received,
                "bytes_received_by_op": dict(self.bytes_by_op),
                "parts_received": self.parts_received,
                "sts_issued": self.sts_issued,
                "uploads_initiated": self.uploads_initiated,
                "uploads_completed": self.uploads_completed,
                "uploads_aborted": self.uploads_aborted,
                "oidc_tokens": dict(self.oidc_tokens),
                "callback_headers": dict(self.callback_headers),
                "callbacks": dict(self.callbacks),
                "assume_role_sessions": dict(self.sessions),
            }
