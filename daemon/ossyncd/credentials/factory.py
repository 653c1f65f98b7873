"""``build_source``: the Source named by ``credentials.source``.

It reads a validated ``CredentialsConfig``: config.py owns every default and every check, so
nothing here can reject a config that loaded."""

from __future__ import annotations

from ossyncd import policy as _policy
from ossyncd.config import CredentialsConfig

from .base import Source
from .http import BrokerSource, EcsRamRoleSource
from .static import EnvSource, StaticSource
from .sts import StsSource


def _session_policy(cc: CredentialsConfig, bucket: str, prefixes: list[str],
                    features: dict[str, bool]) -> str | None:
    """The AssumeRole Policy: the inline one, or the one scoped to the watch prefixes (whose
    length config.Config checked for this bucket and these prefixes)."""
    if cc.scope_policy_to_prefixes:
        return _policy.inline_policy_json(bucket, prefixes, **features)
    return cc.policy or None


def build_source(cc: CredentialsConfig, *, bucket: str, prefixes: list[str],
                 features: dict[str, bool] | None = None) -> Source:
    """``features``: Config.policy_features, for the policy scoped to the prefixes."""
    if cc.source == "sts":
        return StsSource(access_key_id=cc.access_key_id, access_key_secret=cc.access_key_secret,
                         role_arn=cc.role_arn, session_name=cc.session_name,
                         duration_seconds=cc.duration_seconds, endpoint=cc.sts_endpoint,
                         region=cc.sts_region, policy=_session_policy(cc, bucket, prefixes, features or {}),
                         timeout=cc.timeout_seconds)
    if cc.source == "broker":
        return BrokerSource(url=cc.broker_url, token=cc.broker_token, headers=cc.broker_headers,
                            timeout=cc.timeout_seconds)
    if cc.source == "ecs-ram-role":
        return EcsRamRoleSource(role_name=cc.ecs_role_name, metadata_url=cc.ecs_metadata_url,
                                timeout=cc.timeout_seconds)
    if cc.source == "env":
        return EnvSource()
    return StaticSource(access_key_id=cc.access_key_id, access_key_secret=cc.access_key_secret,
                        security_token=cc.security_token)
