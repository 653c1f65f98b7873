"""The Emulator object: storage + authority + STS + faults + counters behind two HTTP servers."""

import threading

from . import server
from .auth import Authority
from .callback import TIMEOUT as CALLBACK_TIMEOUT
from .callback import Signer
from .faults import FaultEngine, Stats
from .hosts import Endpoints
from .oidc import TestIssuer
from .storage import Storage
from .sts import AssumeRole


class Emulator:
    """Local OSS + STS emulator.

    >>> emu = Emulator(tmpdir, buckets=["drop"], min_duration=900, region="cn-hangzhou", crc64=True)
    >>> emu.start(); emu.oss_url, emu.sts_url, emu.root.id, emu.user.secret, emu.role_arn
    >>> emu.proxy_env()   # {"HTTP_PROXY": emu.oss_url, ...}: reach it as http://oss-<region>.aliyuncs.com
    >>> emu.stop()
    """

    def __init__(self, data_dir, buckets=("drop",), host="127.0.0.1", port=0, sts_port=0,
                 min_duration=900, region="cn-hangzhou", verbose=False, crc64=True, oidc_issuer=None):
        self.data_dir = data_dir
        self.crc64 = crc64   # False: omit x-oss-hash-crc64ecma (and HashCrc64ecma in ListParts)
        self.region = region
        self.host = host
        self.verbose = verbose
        self._ports = (port, sts_port)
        self.storage = Storage(data_dir, list(buckets) or ["drop"])
        self.authority = Authority(region)
        self.endpoints = Endpoints(region)
        # the RRSA issuer AssumeRoleWithOIDC trusts; emu.oidc.token(ttl=3) mints a service-account JWT
        self.oidc = oidc_issuer or TestIssuer()
        self.assume_role = AssumeRole(self.authority, min_duration=min_duration, issuer=self.oidc)
        self.faults = FaultEngine()
        self.counters = Stats()
        self.signer = Signer()    # upload callbacks' RSA key (callback.py)
        self.callback_timeout = CALLBACK_TIMEOUT   # OSS's 5 s; a test may shorten it
        self.oss_url = self.sts_url = None
        self._servers = []
        self._threads = []

    # ------------------------------------------------------------ lifecycle
    def start(self):
        self.faults.stopping.clear()
        oss = server.make_server(self.host, self._ports[0], server.OSSHandler, self)
        sts = server.make_server(self.host, self._ports[1], server.STSHandler, self)
        self._servers = [oss, sts]
        self.oss_url = f"http://{self.host}:{oss.server_address[1]}"
        self.sts_url = f"http://{self.host}:{sts.server_address[1]}"
        for srv, name in ((oss, "ossemu-oss"), (sts, "ossemu-sts")):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self):
        self.faults.stopping.set()
        stoppers = [threading.Thread(target=srv.shutdown) for srv in self._servers]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        for srv in self._servers:
            srv.server_close()
            srv.close_connections()
        for t in self._threads:
            t.join(5)
        self._servers, self._threads = [], []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------ identity
    @property
    def root(self):
        return self.authority.root

    @property
    def user(self):
        return self.authority.user

    @property
    def role_arn(self):
        return self.authority.role_arn

    @property
    def full_role_arn(self):
        """The role that also allows tags, KMS and reading objects back (conflict recognition)."""
        return self.authority.full_role_arn

    @property
    def relay_role_arn(self):
        return self.authority.relay_role_arn

    @property
    def oss_endpoint(self):
        """The real endpoint name; reachable through the OSS port as a forward proxy (hosts.py)."""
        return f"http://{self.endpoints.oss[0]}"

    @property
    def sts_endpoint(self):
        return f"http://{self.endpoints.sts[1]}"

    def proxy_env(self):
        """Environment that sends oss2, aliyunsdkcore and requests to the endpoint names through us."""
        return {"HTTP_PROXY": self.oss_url, "http_proxy": self.oss_url}

    def info(self):
        return {"oss": self.oss_url, "sts": self.sts_url, "region": self.region,
                "proxy": self.oss_url, "oss_endpoint": self.oss_endpoint, "sts_endpoint": self.sts_endpoint,
                "root": {"id": self.root.id, "secret": self.root.secret},
                "user": {"id": self.user.id, "secret": self.user.secret},
                "role_arn": self.role_arn, "full_role_arn": self.full_role_arn,
                "oidc": {"issuer": self.oidc.issuer, "provider_arn": self.oidc.provider_arn}}

    # ------------------------------------------------------------ control
    def stats(self):
        s = self.counters.snapshot()
        s["uploads_open"] = len(self.storage.open_uploads())
        s["objects"] = self.storage.object_count()
        return s

    def reset_stats(self):
        self.counters.reset()

    def set_faults(self, rules, append=False):
        self.faults.set(list(rules), append=append)
        return self.faults.list()

    def clear_faults(self):
        self.faults.clear()

    def expire_tokens(self):
        return self.authority.expire_all()

    def uploads(self):
        return [{"bucket": u.bucket, "key": u.key, "upload_id": u.upload_id, "initiated": u.initiated,
                 "parts": [{"number": p.number, "size": p.size, "etag": p.etag, "crc64": p.crc64} for p in parts]}
                for u, parts in self.storage.open_uploads()]

    def objects(self, bucket=None):
        out = []
        with self.storage.lock:
            for b in self.storage.buckets.values():
                if bucket is None or b.name == bucket:
                    out += [{"bucket": b.name, "key": m.key, "size": m.size, "etag": m.etag, "crc64": m.crc64,
                             "type": m.type} for m in (b.objects[k] for k in b.keys)]
        return out
