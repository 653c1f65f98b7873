"""The profile files of the default chain, in the formats alibabacloud-credentials reads
(docs/credentials.md):

  * the CLI's ``~/.aliyun/config.json``: ``{"current": NAME, "profiles": [{"name", "mode", ...}]}``,
    modes AK, StsToken, RamRoleArn, ChainableRamRoleArn (``source_profile``), EcsRamRole, OIDC,
    External (``process_command``);
  * the INI file ``~/.alibabacloud/credentials.ini``: one section per profile, ``type`` =
    access_key, ram_role_arn, oidc_role_arn or ecs_ram_role.

Each profile becomes one of the existing sources; a file that is broken or lacks the profile is
a permanent CredentialsError naming the file, the profile and the fix (never a value in it)."""

from __future__ import annotations

import configparser
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from ossyncd.errors import CredentialsError

from .base import Source
from .context import LinkContext
from .http import EcsRamRoleSource
from .process import ProcessSource
from .static import StaticSource
from .sts import OidcSource, StsSource, sts_endpoint

CLI_MODES = ("AK", "StsToken", "RamRoleArn", "ChainableRamRoleArn", "EcsRamRole", "OIDC", "External")
INI_TYPES = ("access_key", "ram_role_arn", "oidc_role_arn", "ecs_ram_role")


@dataclass
class Link:
    """A built source and where it came from, for check-config and status (no secret)."""

    source: Source
    description: str


def _fail(msg: str) -> CredentialsError:
    return CredentialsError(msg, transient=False, source="profile", code="Profile")


def cli_config_path(ctx: LinkContext) -> Path:
    return ctx.home() / ".aliyun" / "config.json"


def ini_path(ctx: LinkContext) -> Path:
    return Path(ctx.env("ALIBABA_CLOUD_CREDENTIALS_FILE") or ctx.home() / ".alibabacloud" / "credentials.ini")


def _read(path: Path, ctx: LinkContext) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(f"{ctx.show(path)} does not exist; create it (`aliyun configure` writes config.json) "
                    "or fix credentials.file / ALIBABA_CLOUD_CREDENTIALS_FILE") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise _fail(f"{ctx.show(path)} is unreadable ({reason}); let the daemon's user read it "
                    "(under systemd ProtectHome=, see README Credentials)") from None


def _need(profile: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if not str(profile.get(k) or "").strip()]
    if missing:
        raise _fail(f"{where} lacks {', '.join(missing)}; add {'it' if len(missing) == 1 else 'them'}")


# --- ~/.aliyun/config.json ------------------------------------------------------------------


def cli_profile(ctx: LinkContext, *, name: str = "", path: Path | None = None) -> Link:
    """The named (else ALIBABA_CLOUD_PROFILE, else ``current``) profile of the CLI config."""
    path = path or cli_config_path(ctx)
    text = _read(path, ctx)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(f"{ctx.show(path)} is not valid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                    "fix it or run `aliyun configure`") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("profiles", []), list):
        raise _fail(f"{ctx.show(path)} has no \"profiles\" list; run `aliyun configure`")
    name = name or ctx.env("ALIBABA_CLOUD_PROFILE") or str(doc.get("current") or "")
    if not name:
        raise _fail(f"{ctx.show(path)} names no \"current\" profile; set ALIBABA_CLOUD_PROFILE or "
                    "credentials.profile")
    profiles = {p.get("name"): p for p in doc.get("profiles") or [] if isinstance(p, dict)}
    return _cli_link(ctx, path, profiles, name, seen=())


def _cli_link(ctx: LinkContext, path: Path, profiles: dict, name: str, seen: tuple[str, ...]) -> Link:
    shown = ctx.show(path)
    if name in seen:
        raise _fail(f"{shown}: profile {name!r} is its own source_profile (via {' -> '.join(seen)}); "
                    "break the loop")
    p = profiles.get(name)
    if p is None:
        known = ", ".join(sorted(str(n) for n in profiles if n)) or "none"
        raise _fail(f"profile {name!r} is not in {shown} (profiles: {known}); set ALIBABA_CLOUD_PROFILE "
                    "or credentials.profile to one of them")
    mode = p.get("mode")
    where = f"profile {name!r} in {shown} (mode {mode})"
    desc = f"profile \"{name}\" in {shown}, mode {mode}"
    region, vpc = p.get("sts_region") or None, p.get("enable_vpc")
    endpoint = sts_endpoint(ctx.sts_endpoint or None, region=region, vpc=vpc, environ=ctx.environ)
    duration = int(p.get("expired_seconds") or ctx.duration_seconds)
    session = p.get("ram_session_name") or ctx.session_name
    if mode == "AK":
        _need(p, ("access_key_id", "access_key_secret"), where)
        src: Source = StaticSource(access_key_id=p["access_key_id"], access_key_secret=p["access_key_secret"])
    elif mode == "StsToken":
        _need(p, ("access_key_id", "access_key_secret", "sts_token"), where)
        src = StaticSource(access_key_id=p["access_key_id"], access_key_secret=p["access_key_secret"],
                           security_token=p["sts_token"])
    elif mode == "RamRoleArn":
        _need(p, ("access_key_id", "access_key_secret", "ram_role_arn"), where)
        src = StsSource(access_key_id=p["access_key_id"], access_key_secret=p["access_key_secret"],
                        role_arn=p["ram_role_arn"], endpoint=endpoint, session_name=session,
                        duration_seconds=duration, policy=p.get("policy") or ctx.policy, timeout=ctx.timeout,
                        key_from=f"profile {name!r} in {shown}")
    elif mode == "ChainableRamRoleArn":
        _need(p, ("source_profile", "ram_role_arn"), where)
        base = _cli_link(ctx, path, profiles, p["source_profile"], seen + (name,))
        src = StsSource(base=base.source, role_arn=p["ram_role_arn"], endpoint=endpoint, session_name=session,
                        duration_seconds=duration, policy=p.get("policy") or ctx.policy, timeout=ctx.timeout)
        desc += f" (source_profile \"{p['source_profile']}\")"
    elif mode == "EcsRamRole":
        src = EcsRamRoleSource(metadata_url=ctx.ecs_metadata_url, role_name=p.get("ram_role_name") or "",
                               timeout=ctx.timeout, token_first=True)
    elif mode == "OIDC":
        _need(p, ("ram_role_arn", "oidc_provider_arn", "oidc_token_file"), where)
        src = OidcSource(role_arn=p["ram_role_arn"], oidc_provider_arn=p["oidc_provider_arn"],
                         oidc_token_file=p["oidc_token_file"], endpoint=endpoint,
                         session_name=p.get("role_session_name") or ctx.session_name,
                         duration_seconds=duration, policy=p.get("policy") or ctx.policy, timeout=ctx.timeout)
    elif mode == "External":
        _need(p, ("process_command",), where)
        try:
            argv = shlex.split(p["process_command"])
        except ValueError as e:
            raise _fail(f"{where}: process_command cannot be split into words ({e}); fix its quoting") from None
        src = ProcessSource(command=argv, timeout=ctx.timeout, where=f"process_command of {where}")
    else:
        raise _fail(f"{where}: mode {mode!r} is not supported; use one of {', '.join(CLI_MODES)}")
    return Link(src, desc)


# --- ~/.alibabacloud/credentials.ini --------------------------------------------------------


def ini_profile(ctx: LinkContext, *, name: str = "", path: Path | None = None) -> Link:
    """The named (else ALIBABA_CLOUD_PROFILE, else ``default``) section of the INI file."""
    path = path or ini_path(ctx)
    shown = ctx.show(path)
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(_read(path, ctx), source=shown)
    except configparser.Error as e:
        line = getattr(e, "lineno", None)
        raise _fail(f"{shown} is not a valid INI file{f' at line {line}' if line else ''} "
                    f"({type(e).__name__}); fix it") from None
    name = name or ctx.env("ALIBABA_CLOUD_PROFILE") or "default"
    if not parser.has_section(name):
        known = ", ".join(parser.sections()) or "none"
        raise _fail(f"profile [{name}] is not in {shown} (sections: {known}); set ALIBABA_CLOUD_PROFILE "
                    "or credentials.profile to one of them")
    # values may carry a trailing "# comment", as alibabacloud-credentials strips it
    s = {k: v.split("#")[0].strip() for k, v in parser.items(name)}
    kind = s.get("type", "")
    where = f"profile [{name}] in {shown} (type {kind})"
    desc = f"profile [{name}] in {shown}, type {kind}"
    endpoint = sts_endpoint(ctx.sts_endpoint or None, environ=ctx.environ)
    if kind == "access_key":
        _need(s, ("access_key_id", "access_key_secret"), where)
        src: Source = StaticSource(access_key_id=s["access_key_id"], access_key_secret=s["access_key_secret"])
    elif kind == "ram_role_arn":
        _need(s, ("access_key_id", "access_key_secret", "role_arn"), where)
        src = StsSource(access_key_id=s["access_key_id"], access_key_secret=s["access_key_secret"],
                        role_arn=s["role_arn"], endpoint=endpoint,
                        session_name=s.get("role_session_name") or ctx.session_name,
                        duration_seconds=ctx.duration_seconds, policy=s.get("policy") or ctx.policy,
                        timeout=ctx.timeout, key_from=f"profile [{name}] in {shown}")
    elif kind == "oidc_role_arn":
        _need(s, ("role_arn", "oidc_provider_arn", "oidc_token_file_path"), where)
        src = OidcSource(role_arn=s["role_arn"], oidc_provider_arn=s["oidc_provider_arn"],
                         oidc_token_file=s["oidc_token_file_path"], endpoint=endpoint,
                         session_name=s.get("role_session_name") or ctx.session_name,
                         duration_seconds=ctx.duration_seconds, policy=s.get("policy") or ctx.policy,
                         timeout=ctx.timeout)
    elif kind == "ecs_ram_role":
        src = EcsRamRoleSource(metadata_url=ctx.ecs_metadata_url, role_name=s.get("role_name") or "",
                               timeout=ctx.timeout, token_first=True)
    else:
        raise _fail(f"{where}: type {kind!r} is not supported; use one of {', '.join(INI_TYPES)}")
    return Link(src, desc)
