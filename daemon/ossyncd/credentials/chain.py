"""``source = "default"``: the official credential chain of alibabacloud-credentials
(DefaultCredentialsProvider; docs/credentials.md), in its order:

  1. environment  ALIBABA_CLOUD_ACCESS_KEY_ID/_SECRET[/SECURITY_TOKEN], else OSS_ACCESS_KEY_ID/...
  2. OIDC (RRSA)  ALIBABA_CLOUD_ROLE_ARN + ALIBABA_CLOUD_OIDC_PROVIDER_ARN + ALIBABA_CLOUD_OIDC_TOKEN_FILE
  3. CLI profile  ~/.aliyun/config.json (unless ALIBABA_CLOUD_CLI_PROFILE_DISABLED=true)
  4. INI profile  ALIBABA_CLOUD_CREDENTIALS_FILE or ~/.alibabacloud/credentials.ini
  5. ECS metadata (unless ALIBABA_CLOUD_ECS_METADATA_DISABLED=true): IMDSv2, one try, <= 1 s
  6. URI          ALIBABA_CLOUD_CREDENTIALS_URI

The first link that yields credentials is remembered and used from then on (as the official
provider's reuse_last_provider); its description is what check-config and status show."""

from __future__ import annotations

from typing import Callable

import structlog

from ossyncd.errors import CredentialsError

from .base import Snapshot, SourceBase
from .context import LinkContext
from .http import EcsRamRoleSource, UriSource
from .profile import Link, cli_config_path, cli_profile, ini_path, ini_profile
from .static import EnvSource
from .sts import OidcSource, sts_endpoint

log = structlog.get_logger("ossyncd.credentials")

OIDC_VARS = ("ALIBABA_CLOUD_ROLE_ARN", "ALIBABA_CLOUD_OIDC_PROVIDER_ARN", "ALIBABA_CLOUD_OIDC_TOKEN_FILE")


def env_oidc(ctx: LinkContext) -> Link:
    role, provider, token_file = (ctx.env(v) for v in OIDC_VARS)
    src = OidcSource(role_arn=role, oidc_provider_arn=provider, oidc_token_file=token_file,
                     endpoint=sts_endpoint(ctx.sts_endpoint or None, environ=ctx.environ),
                     session_name=ctx.env("ALIBABA_CLOUD_ROLE_SESSION_NAME") or ctx.session_name,
                     duration_seconds=ctx.duration_seconds, policy=ctx.policy, timeout=ctx.timeout)
    return Link(src, f"OIDC token file {token_file} (ALIBABA_CLOUD_OIDC_TOKEN_FILE), role {role}")


def _links(ctx: LinkContext) -> list[tuple[str, Callable[[], Link]]]:
    """The links that are configured here, in the official order, each built on demand."""
    out: list[tuple[str, Callable[[], Link]]] = []
    env = EnvSource(ctx.environ)  # type: ignore[arg-type]
    if env.family():
        out.append(("env", lambda: Link(env, env.link_description())))
    if all(ctx.env(v) for v in OIDC_VARS):
        out.append(("oidc", lambda: env_oidc(ctx)))
    if not ctx.flag("ALIBABA_CLOUD_CLI_PROFILE_DISABLED") and cli_config_path(ctx).exists():
        out.append(("cli-profile", lambda: cli_profile(ctx)))
    if ctx.env("ALIBABA_CLOUD_CREDENTIALS_FILE") or ini_path(ctx).exists():
        out.append(("ini-profile", lambda: ini_profile(ctx)))
    if not ctx.flag("ALIBABA_CLOUD_ECS_METADATA_DISABLED"):
        role = ctx.env("ALIBABA_CLOUD_ECS_METADATA")
        out.append(("ecs", lambda: Link(
            EcsRamRoleSource(metadata_url=ctx.ecs_metadata_url, role_name=role, timeout=ctx.ecs_timeout,
                             token_first=True),
            f"ECS instance metadata{f', role {role}' if role else ''}")))
    uri = ctx.env("ALIBABA_CLOUD_CREDENTIALS_URI")
    if uri:
        out.append(("uri", lambda: Link(UriSource(url=uri, timeout=ctx.timeout,
                                                  where="ALIBABA_CLOUD_CREDENTIALS_URI"),
                                        "credentials URI (ALIBABA_CLOUD_CREDENTIALS_URI)")))
    return out


class DefaultChainSource(SourceBase):
    name = "default"

    def __init__(self, ctx: LinkContext):
        self._ctx = ctx
        self._link: Link | None = None

    def describe(self) -> str:
        return f"default: {self._link.description}" if self._link else "default chain"

    def fetch(self) -> Snapshot:
        """The remembered link's credentials; before one worked, each configured link in order
        until one answers. None answering raises the first link's error (the one meant to work),
        transient when any failure was."""
        if self._link is not None:
            return self._link.source.fetch()
        errors: list[tuple[str, CredentialsError]] = []
        for name, build in _links(self._ctx):
            try:
                link = build()
                snap = link.source.fetch()
            except CredentialsError as e:
                errors.append((name, e))
                continue
            self._link = link
            if errors:
                log.warning("credentials.chain_skipped", used=name, skipped=[n for n, _ in errors],
                            errors=[str(e) for _, e in errors])
            log.info("credentials.chain_resolved", link=self.describe())
            return snap
        if not errors:
            raise self._err(
                "no credentials found in the default chain; set ALIBABA_CLOUD_ACCESS_KEY_ID and "
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET, or the RRSA variables, or create ~/.aliyun/config.json "
                "(`aliyun configure`), or set credentials.source (see README Credentials)",
                transient=False, code="NoCredentials")
        first_name, first = errors[0]
        others = f" (also tried: {', '.join(n for n, _ in errors[1:])})" if len(errors) > 1 else ""
        raise self._err(f"{first_name} link: {first}{others}",
                        transient=any(e.transient for _, e in errors), code=first.code)
