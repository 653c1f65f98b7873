"""``build_source``: the Source named by ``credentials.source``.

It reads a validated ``CredentialsConfig``: config.py owns every default and every check, so
nothing here can reject a config that loaded."""

from __future__ import annotations

from pathlib import Path

from ossyncd import policy as _policy
from ossyncd.config import CredentialsConfig

from .base import Source
from .context import LinkContext
from .static import StaticSource

# Each source's module is imported when that source is built: a host with static keys or a
# broker never loads the STS, profile, chain or process modules (docs/architecture.md §15).


def _session_policy(cc: CredentialsConfig, bucket: str, prefixes: list[str],
                    features: dict[str, bool]) -> str | None:
    """The AssumeRole Policy: the inline one, or the one scoped to the watch prefixes (whose
    length config.Config checked for this bucket and these prefixes)."""
    if cc.scope_policy_to_prefixes:
        return _policy.inline_policy_json(bucket, prefixes, **features)
    return cc.policy or None


def link_context(cc: CredentialsConfig, policy: str | None = None) -> LinkContext:
    return LinkContext(sts_endpoint=cc.sts_endpoint if "sts_endpoint" in cc.model_fields_set else "",
                       session_name=cc.session_name, duration_seconds=cc.duration_seconds, policy=policy,
                       timeout=cc.timeout_seconds, ecs_metadata_url=cc.ecs_metadata_url,
                       ecs_timeout=min(1.0, cc.timeout_seconds))


class _Described:
    """A profile's source under the name ``profile``, describing where it came from."""

    def __init__(self, source: Source, name: str, description: str):
        self._source, self.name, self._description = source, name, description

    def describe(self) -> str:
        return self._description

    def fetch(self):
        return self._source.fetch()


def _explicit_profile(cc: CredentialsConfig, ctx: LinkContext) -> Source:
    from .profile import cli_profile, ini_profile
    path = Path(cc.file).expanduser() if cc.file else None
    if path is not None and path.suffix != ".json":
        link = ini_profile(ctx, name=cc.profile, path=path)
    else:
        link = cli_profile(ctx, name=cc.profile, path=path)
    return _Described(link.source, "profile", link.description)


def _chain_source(cc: CredentialsConfig, bucket: str, prefixes: list[str], features: dict[str, bool]) -> Source:
    """The sources that read the official chain's files and variables; role_arn in the config
    turns whatever they yield into AssumeRole tokens, as with source = "sts"."""
    from .chain import DefaultChainSource
    from .process import ProcessSource
    from .static import EnvSource
    from .sts import StsSource, sts_endpoint
    policy = _session_policy(cc, bucket, prefixes, features)
    ctx = link_context(cc, None if cc.role_arn else policy)
    src: Source
    if cc.source == "default":
        src = DefaultChainSource(ctx)
    elif cc.source == "profile":
        src = _explicit_profile(cc, ctx)
    elif cc.source == "env":
        src = EnvSource()
    else:
        src = ProcessSource(command=list(cc.command), timeout=cc.timeout_seconds)
    if not cc.role_arn or cc.source == "env":   # env ignored role_arn before the chain existed; it still does
        return src
    return StsSource(base=src, role_arn=cc.role_arn, session_name=cc.session_name,
                     duration_seconds=cc.duration_seconds, region=cc.sts_region, policy=policy,
                     endpoint=sts_endpoint(ctx.sts_endpoint or None), timeout=cc.timeout_seconds)


def build_source(cc: CredentialsConfig, *, bucket: str, prefixes: list[str],
                 features: dict[str, bool] | None = None) -> Source:
    """``features``: Config.policy_features, for the policy scoped to the prefixes."""
    features = features or {}
    if cc.source in ("default", "profile", "env", "process"):
        return _chain_source(cc, bucket, prefixes, features)
    if cc.source == "oidc":
        from .sts import OidcSource, sts_endpoint
        return OidcSource(role_arn=cc.role_arn, oidc_provider_arn=cc.oidc_provider_arn,
                          oidc_token_file=cc.oidc_token_file,
                          endpoint=sts_endpoint(cc.sts_endpoint if "sts_endpoint" in cc.model_fields_set else None),
                          session_name=cc.session_name, duration_seconds=cc.duration_seconds,
                          policy=_session_policy(cc, bucket, prefixes, features), timeout=cc.timeout_seconds)
    if cc.source == "uri":
        from .http import UriSource
        return UriSource(url=cc.url, timeout=cc.timeout_seconds)
    if cc.source == "sts":
        from .sts import StsSource
        return StsSource(access_key_id=cc.access_key_id, access_key_secret=cc.access_key_secret,
                         role_arn=cc.role_arn, session_name=cc.session_name,
                         duration_seconds=cc.duration_seconds, endpoint=cc.sts_endpoint,
                         region=cc.sts_region, policy=_session_policy(cc, bucket, prefixes, features),
                         timeout=cc.timeout_seconds)
    if cc.source == "broker":
        from .http import BrokerSource
        return BrokerSource(url=cc.broker_url, token=cc.broker_token, headers=cc.broker_headers,
                            timeout=cc.timeout_seconds)
    if cc.source == "ecs-ram-role":
        from .http import EcsRamRoleSource
        return EcsRamRoleSource(role_name=cc.ecs_role_name, metadata_url=cc.ecs_metadata_url,
                                timeout=cc.timeout_seconds)
    return StaticSource(access_key_id=cc.access_key_id, access_key_secret=cc.access_key_secret,
                        security_token=cc.security_token)
