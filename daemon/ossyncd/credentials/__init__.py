"""Credential sources and rotation.

Sources (``build_source``) each make ONE network attempt per ``fetch()`` and
return an immutable ``Snapshot`` or raise ``CredentialsError`` whose
``transient`` flag says whether retrying can help:

  * ``sts``          RAM user AccessKey -> STS AssumeRole (aliyunsdksts)
  * ``broker``       HTTP(S) GET returning AccessKeyId/AccessKeySecret/SecurityToken/Expiration
  * ``ecs-ram-role`` the ECS instance metadata service
  * ``env``          OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET / OSS_SESSION_TOKEN
  * ``static``       keys from the config file
  * ``default``      the official alibabacloud-credentials chain (chain.py; docs/credentials.md)
  * ``profile``      one profile of ~/.aliyun/config.json or credentials.ini (profile.py)
  * ``oidc``         RRSA: STS AssumeRoleWithOIDC with a token file (sts.py)
  * ``process``      an external command printing JSON (process.py)
  * ``uri``          a credentials URI answering {"Code": "Success", ...} (http.py)

``RotatingCredentials`` caches the current snapshot, refreshes it at
``refresh_fraction`` of its lifetime (``tick(now)`` + a thin thread loop), keeps
the old snapshot after a failed refresh until it expires, retries with
exponential backoff and jitter, and deduplicates concurrent refreshes (single
flight).  store.py wraps it in an ``oss2.CredentialsProvider``.

Modules: ``base`` (Snapshot, Source, scrubbing, Expiration parsing), ``sts`` (the only
importer of aliyunsdkcore / aliyunsdksts), ``http`` (broker, ecs-ram-role), ``static`` (env,
static), ``factory`` (``build_source``), ``rotating`` (``RotatingCredentials``).  None imports
oss2, and the sources never call each other.

Secrets (AccessKeySecret, SecurityToken, the RAM user's secret, the broker's
bearer token and header values) never appear in log events, exception messages,
reprs or ``status()``: every message built here goes through the source's
``_scrub`` (base.SourceBase) and never includes raw server bodies.
"""

from typing import TYPE_CHECKING

from ossyncd.errors import CredentialsError

from .base import Snapshot, Source, parse_expiration
from .factory import build_source
from .rotating import RotatingCredentials
from .static import EnvSource, StaticSource

if TYPE_CHECKING:
    from .chain import DefaultChainSource
    from .http import BrokerSource, EcsRamRoleSource, UriSource
    from .process import ProcessSource
    from .sts import OidcSource, StsSource

# The other sources' modules load at first use (build_source imports the one a config names):
# a host with static keys never compiles or imports them (docs/architecture.md §15).
_LAZY = {"DefaultChainSource": "chain", "BrokerSource": "http", "EcsRamRoleSource": "http", "UriSource": "http",
         "ProcessSource": "process", "OidcSource": "sts", "StsSource": "sts"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CredentialsError",
    "Snapshot",
    "Source",
    "StsSource",
    "BrokerSource",
    "EcsRamRoleSource",
    "EnvSource",
    "StaticSource",
    "DefaultChainSource",
    "UriSource",
    "ProcessSource",
    "OidcSource",
    "build_source",
    "RotatingCredentials",
    "parse_expiration",
]
