"""Load and validate the TOML configuration into frozen objects.

Key names are an interface (config/ossyncd.example.toml lists them all). Every error names the key
and what to do, e.g. ``watch[0].path: /srv/drop does not exist; create it``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ossyncd import objectspec as _spec
from ossyncd import policy as _policy
from ossyncd.errors import ConfigError
from ossyncd.paths import TEMP_RULES, is_excluded, temp_rule

DEFAULT_CONFIG_PATH = "/etc/ossyncd/ossyncd.toml"
MAX_PARTS = 10_000
MIN_PART_SIZE = 100 * 1024
MAX_PART_SIZE = 5 * 1024**3

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
          "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3, "t": 1024**4, "tib": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any) -> int:
    """'8MiB' -> 8388608. Integers are bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 8MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a size; write e.g. 512KiB, 8MiB or 1GiB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n == 0 and float(m.group(1)) != 0:  # "0.5" would silently mean 0 (for bandwidth_limit: unlimited)
        raise ValueError(f"{value!r} is less than 1 byte; write a whole number of bytes or a larger unit "
                         f"(e.g. 512KiB), or exactly 0")
    return n


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OssConfig(_Section):
    endpoint: str = ""       # required, except with source = "broker" (its first answer names it)
    bucket: str = ""         # likewise
    region: str = ""
    signature: Literal["v1", "v4"] = "v4"
    public_base_url: str = ""
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not v:
            return v
        if "://" not in v:
            v = "https://" + v
        u = urlparse(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"{v!r} is not an http(s) endpoint; write e.g. https://oss-cn-shanghai.aliyuncs.com")
        return v

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if v and not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", v):
            raise ValueError(f"{v!r} is not a valid bucket name (3-63 of a-z, 0-9 and '-', not starting or ending with '-')")
        return v

    @model_validator(mode="after")
    def _required(self, info: ValidationInfo) -> "OssConfig":
        # with source = "broker" what is left out comes from the broker's first answer
        # (fleet.resolve_oss, at start); a value given here must then equal the broker's
        if (info.context or {}).get("oss_from_broker"):
            return self
        for key in ("endpoint", "bucket"):
            if not getattr(self, key):
                raise ValueError(f"{key}: required; add it (only source = \"broker\" may leave it out)")
        if self.signature == "v4" and not self.region:
            raise ValueError("region: required with signature = \"v4\"; set it (e.g. \"cn-shanghai\") or use signature = \"v1\"")
        return self


# the sources that may call AssumeRole / AssumeRoleWithOIDC with credentials.policy
_STS_CALLERS = ("sts", "oidc", "default", "profile", "process")


class CredentialsConfig(_Section):
    source: Literal["sts", "broker", "ecs-ram-role", "env", "static", "default", "profile", "oidc", "process",
                    "uri"] = "sts"
    access_key_id: str = ""
    access_key_secret: str = Field("", repr=False)
    security_token: str = Field("", repr=False)
    role_arn: str = ""
    session_name: str = "ossyncd"
    duration_seconds: int = Field(3600, ge=1, le=43200)
    sts_region: str = "cn-hangzhou"               # before sts_endpoint: an empty endpoint derives from it
    sts_endpoint: str = "https://sts.aliyuncs.com"
    policy: str = ""
    scope_policy_to_prefixes: bool = False
    broker_url: str = ""
    broker_token: str = Field("", repr=False)
    broker_headers: dict[str, str] = Field(default_factory=dict, repr=False)
    broker_heartbeat_url: str = ""                 # default: derived from broker_url (fleet.heartbeat_url)
    broker_heartbeat_interval: float = Field(60.0, ge=0)   # seconds between heartbeats at most; 0 = off
    ecs_role_name: str = ""
    ecs_metadata_url: str = "http://100.100.100.200/latest/meta-data/ram/security-credentials/"
    profile: str = ""                              # profile: the profile name (else ALIBABA_CLOUD_PROFILE)
    file: str = ""                                 # profile: config.json (*.json) or credentials.ini
    oidc_provider_arn: str = ""
    oidc_token_file: str = ""
    command: tuple[str, ...] = ()                  # process: argv, run without a shell
    url: str = ""                                  # uri: the credentials URI
    timeout_seconds: float = Field(10.0, gt=0)
    retry_backoff: float = Field(1.0, gt=0)        # first wait after a failed credentials fetch
    retry_backoff_max: float = Field(60.0, gt=0)   # longest wait between fetch attempts

    @field_validator("session_name", "sts_region", "ecs_metadata_url")
    @classmethod
    def _empty_is_default(cls, v: str, info: ValidationInfo) -> str:
        return v or cls.model_fields[str(info.field_name)].default

    @field_validator("sts_endpoint")
    @classmethod
    def _sts_endpoint(cls, v: str, info: ValidationInfo) -> str:
        if not v:
            return f"https://sts.{info.data.get('sts_region') or 'cn-hangzhou'}.aliyuncs.com"
        return v if "://" in v else "https://" + v

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str, info: ValidationInfo) -> str:
        """Compacted, since AssumeRole limits the Policy parameter's length; only the sources
        that call STS send it."""
        v = v.strip()
        if not v or info.data.get("source") not in _STS_CALLERS:
            return v
        try:
            v = json.dumps(json.loads(v), separators=(",", ":"))
        except ValueError as e:
            raise ValueError(f"is not valid JSON ({e}); write a RAM policy document, or see "
                             f"`ossyncd policy` for one") from None
        if len(v) > _policy.MAX_INLINE_POLICY_CHARS:
            raise ValueError(f"is {len(v)} characters compacted, over the {_policy.MAX_INLINE_POLICY_CHARS}"
                             f"-character AssumeRole limit; shorten it or use scope_policy_to_prefixes")
        return v

    @model_validator(mode="after")
    def _required(self, info: ValidationInfo) -> "CredentialsConfig":
        # the key pair usually comes from credentials.env, which only the service gets: commands
        # that work on the state DB alone (status, list, pause, resume, retry) do without it
        keys_needed = (info.context or {}).get("credentials_needed", True)
        if self.source == "sts":
            if not self.role_arn:
                raise ValueError("role_arn: required with source = \"sts\"; set the uploader role's ARN")
            if keys_needed and not (self.access_key_id and self.access_key_secret):
                raise ValueError("access_key_id/access_key_secret: required with source = \"sts\"; "
                                 "set them or OSSYNCD_ACCESS_KEY_ID / OSSYNCD_ACCESS_KEY_SECRET")
            if self.policy and self.scope_policy_to_prefixes:
                raise ValueError("policy: set either policy or scope_policy_to_prefixes, not both")
            _check_url("sts_endpoint", self.sts_endpoint, "write e.g. https://sts.cn-hangzhou.aliyuncs.com")
        if self.source == "broker":
            if not self.broker_url:
                raise ValueError("broker_url: required with source = \"broker\"")
            _check_url("broker_url", self.broker_url, "write the http(s) URL that returns AccessKeyId/"
                       "AccessKeySecret/SecurityToken/Expiration")
            if self.broker_heartbeat_url:
                _check_url("broker_heartbeat_url", self.broker_heartbeat_url,
                           "write the broker's http(s) .../v1/heartbeat URL, or remove the key to derive it")
        if self.source == "ecs-ram-role":
            default = CredentialsConfig.model_fields["ecs_metadata_url"].default
            _check_url("ecs_metadata_url", self.ecs_metadata_url, f"write e.g. {default} or remove the key")
        if self.source == "oidc":
            missing = [k for k in ("role_arn", "oidc_provider_arn", "oidc_token_file") if not getattr(self, k)]
            if missing:
                raise ValueError(f"{missing[0]}: required with source = \"oidc\"; set role_arn, "
                                 "oidc_provider_arn and oidc_token_file (the RRSA values of the pod)")
        if self.source == "process" and not (self.command and self.command[0]):
            raise ValueError("command: required with source = \"process\"; write the argv as a list, "
                             "e.g. [\"/usr/local/bin/get-creds\", \"--json\"]")
        if self.source == "uri":
            if not self.url:
                raise ValueError("url: required with source = \"uri\"")
            _check_url("url", self.url, "write the http(s) URL that answers {\"Code\": \"Success\", "
                       "\"AccessKeyId\", ...}")
        if self.source == "static" and keys_needed and not (self.access_key_id and self.access_key_secret):
            raise ValueError("access_key_id/access_key_secret: required with source = \"static\"; "
                             "set them or OSSYNCD_ACCESS_KEY_ID / OSSYNCD_ACCESS_KEY_SECRET")
        return self


def _check_url(key: str, url: str, fix: str) -> None:
    parts = urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{key}: {url!r} is not an http(s) URL; {fix}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"{key}: {url!r} has an invalid port; {fix}") from None


class UploadConfig(_Section):
    multipart_threshold: int = 8 * 1024**2
    part_size: int | None = None          # None = auto
    preferred_part_size: int = 8 * 1024**2
    max_parts: int = Field(MAX_PARTS, ge=1, le=MAX_PARTS)
    parallel_parts: int = Field(4, ge=1, le=64)
    max_files_in_flight: int = Field(4, ge=1, le=256)
    bandwidth_limit: int = 0
    request_retries: int = Field(5, ge=0, le=50)
    retry_backoff: float = Field(0.5, gt=0)
    retry_backoff_max: float = Field(20.0, gt=0)
    file_retry_delay: float = Field(30.0, gt=0)
    file_retry_delay_max: float = Field(3600.0, gt=0)

    @field_validator("multipart_threshold", "preferred_part_size", "bandwidth_limit", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)

    @field_validator("part_size", mode="before")
    @classmethod
    def _part_size(cls, v: Any) -> int | None:
        if v is None or (isinstance(v, str) and v.strip().lower() == "auto"):
            return None
        n = parse_size(v)
        if not MIN_PART_SIZE <= n <= MAX_PART_SIZE:
            raise ValueError("must be \"auto\" or between 100KiB and 5GiB (OSS limits)")
        return n

    @field_validator("multipart_threshold")
    @classmethod
    def _threshold(cls, v: int) -> int:
        if not 1 <= v <= MAX_PART_SIZE:
            raise ValueError("must be between 1 byte and 5GiB (PutObject limit)")
        return v

    @field_validator("preferred_part_size")
    @classmethod
    def _preferred(cls, v: int) -> int:
        if not MIN_PART_SIZE <= v <= MAX_PART_SIZE:
            raise ValueError("must be between 100KiB and 5GiB")
        return v


def _one_of(v: str, allowed: tuple[str, ...] | list[str], what: str) -> str:
    if v and v not in allowed:
        raise ValueError(f"{v!r} is not {what}; write one of " + ", ".join(f'"{c}"' for c in allowed)
                         + ", or remove the key")
    return v


class ObjectSpec(_Section):
    """What each object gets (objectspec.py renders it). Set in [upload] as defaults; a [[watch]]
    overrides any key, and its tables (content_type, metadata, tags) are laid over the defaults'."""

    content_type: dict[str, str] = Field(default_factory=dict)   # ".log" -> "text/plain; charset=utf-8"
    cache_control: str = ""
    content_disposition: str = ""                                 # may use {name}
    metadata: dict[str, str] = Field(default_factory=dict)        # x-oss-meta-NAME = template
    acl: Literal["default", "private", "public-read"] = "default"
    storage_class: str = ""                                       # "" = the bucket's default
    server_side_encryption: str = ""
    kms_key_id: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    key_template: str = "{prefix}{relpath}"
    unicode_normalize: Literal["NFC", "none"] = "NFC"
    overwrite: Literal["allow", "forbid", "skip", "rename"] = "allow"   # when the key already holds an object
    # OSS upload callback (docs/wire-protocol.md §9): OSS POSTs callback_body to callback_url after storing
    callback_url: tuple[str, ...] = ()                            # up to 5; "a;b" or a list
    callback_host: str = ""                                       # Host of the POST ("" = the URL's host)
    callback_body: str = ""                                       # "" = objectspec.DEFAULT_CALLBACK_BODY
    callback_body_type: Literal["application/x-www-form-urlencoded", "application/json"] = \
        "application/x-www-form-urlencoded"
    callback_vars: dict[str, str] = Field(default_factory=dict)   # "x:name" = template, as ${x:name}

    @field_validator("content_type")
    @classmethod
    def _types(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for ext, typ in v.items():
            if not ext.startswith(".") or "/" in ext or len(ext) < 2:
                raise ValueError(f"{ext!r}: keys are extensions with their dot, e.g. \".log\"")
            if "/" not in typ or not typ.isascii() or _CTL.search(typ):
                raise ValueError(f"{ext!r} = {typ!r} is not a media type; write e.g. \"text/plain; charset=utf-8\"")
            out[ext.lower()] = typ
        return out

    @field_validator("cache_control", "content_disposition", "kms_key_id")
    @classmethod
    def _header(cls, v: str) -> str:
        if _CTL.search(v) or not v.isascii():
            raise ValueError(f"{v!r} has a control or non-ASCII character; HTTP headers cannot carry it")
        return v

    @field_validator("content_disposition")
    @classmethod
    def _disposition(cls, v: str) -> str:
        return _spec.check_template(v, _spec.DISPOSITION_FIELDS)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for name, value in v.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                raise ValueError(f"{name!r}: metadata names are letters, digits, '-' and '_' (sent as "
                                 f"x-oss-meta-NAME, lowercased by OSS)")
            if _CTL.search(value):
                raise ValueError(f"{name} = {value!r} has a control character; remove it")
            out[name.lower()] = _spec.check_template(value, _spec.METADATA_FIELDS)
        return out

    @field_validator("storage_class")
    @classmethod
    def _class(cls, v: str) -> str:
        return _one_of(v, _spec.STORAGE_CLASSES, "an OSS storage class")

    @field_validator("server_side_encryption")
    @classmethod
    def _sse(cls, v: str) -> str:
        return _one_of(v, _spec.SSE_VALUES, "an OSS encryption")

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > _spec.MAX_TAGS:
            raise ValueError(f"{len(v)} tags; OSS allows at most {_spec.MAX_TAGS} per object - remove some")
        for k, val in v.items():
            if not 1 <= len(k) <= _spec.MAX_TAG_KEY:
                raise ValueError(f"tag key {k[:40]!r} is {len(k)} characters; OSS allows 1 to {_spec.MAX_TAG_KEY}")
            if len(val) > _spec.MAX_TAG_VALUE:
                raise ValueError(f"tag {k!r} has a value of {len(val)} characters; OSS allows at most "
                                 f"{_spec.MAX_TAG_VALUE}")
        return v

    @field_validator("key_template")
    @classmethod
    def _key_template(cls, v: str) -> str:
        fields = _spec.check_template(v, _spec.KEY_FIELDS) and _spec.template_fields(v)
        if not {"relpath", "name", "stem"} & set(fields):
            raise ValueError(f"{v!r} names no part of the file ({{relpath}}, {{name}} or {{stem}}), so every "
                             f"file would get the same key; add {{relpath}}")
        if v.startswith("/"):
            raise ValueError(f"{v!r} starts with '/'; OSS keys cannot")
        return v

    @field_validator("callback_url", mode="before")
    @classmethod
    def _callback_urls(cls, v: Any) -> Any:
        if isinstance(v, str):    # OSS's own form: URLs separated by ';'
            return tuple(u.strip() for u in v.split(";") if u.strip())
        return v

    @field_validator("callback_url")
    @classmethod
    def _callback_url(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) > _spec.MAX_CALLBACK_URLS:
            raise ValueError(f"{len(v)} URLs; OSS takes at most {_spec.MAX_CALLBACK_URLS} (tried in order)")
        for u in v:
            try:
                _check_url("url", u, "write the http(s) URL of the application server OSS calls")
            except ValueError as e:
                raise ValueError(str(e).removeprefix("url: ")) from None
            if _CTL.search(u) or not u.isascii():
                raise ValueError(f"{u!r} has a control or non-ASCII character; percent-encode it")
        return v

    @field_validator("callback_host")
    @classmethod
    def _callback_host(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?", v):
            raise ValueError(f"{v!r} is not a host name; write e.g. \"app.example.com\" (or leave it out: the "
                             f"URL's host is used)")
        return v

    @field_validator("callback_vars")
    @classmethod
    def _callback_vars(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            _spec.check_callback_var(name)
            if name in _spec.OUR_CALLBACK_VARS:
                raise ValueError(f"{name!r} is ossyncd's own variable; choose another name")
            _spec.check_template(value, _spec.METADATA_FIELDS)
        return v

    @model_validator(mode="after")
    def _kms(self) -> "ObjectSpec":
        if self.kms_key_id and self.server_side_encryption != "KMS":
            raise ValueError("kms_key_id: only used with server_side_encryption = \"KMS\"; set that or remove "
                             "kms_key_id")
        return self

    @model_validator(mode="after")
    def _callback(self, info: ValidationInfo) -> "ObjectSpec":
        if not self.callback_url:
            # a key written in this section without callback_url is a mistake; one inherited from
            # [upload] by a watch that turned callbacks off (callback_url = []) is not
            if info.context is not None and "own" not in info.context:
                return self    # checked where it was written (_object_spec), not again inside Config
            own = (info.context or {}).get("own")
            for k in ("callback_host", "callback_body", "callback_vars"):
                if getattr(self, k) and (own is None or k in own):
                    raise ValueError(f"{k}: only used with callback_url; set that or remove {k}")
            return self
        try:
            _spec.check_callback_body(_spec.callback_body(self), self.callback_body_type, set(self.callback_vars))
        except ValueError as e:
            raise ValueError(f"callback_body: {e}") from None
        return self


OBJECT_KEYS = tuple(ObjectSpec.model_fields)
_TABLES = ("content_type", "metadata", "tags", "callback_vars")
_CTL = re.compile(r"[\x00-\x1f\x7f]")


class StateConfig(_Section):
    path: Path = Path("/var/lib/ossyncd/state.db")


class WatchConfig(_Section):
    index: int = 0
    path: Path
    prefix: str = ""
    recursive: bool = True
    exclude: tuple[str, ...] = ()
    settle_seconds: float = Field(2.0, ge=0)
    after_upload: Literal["keep", "delete", "move"] = "keep"
    move_to: Path | None = None
    follow_symlinks: bool = False
    temp_names: tuple[str, ...] | None = None   # None: every built-in rule (paths.TEMP_RULES)
    object: ObjectSpec = ObjectSpec()           # [upload]'s object keys with this watch's laid over
    # ready markers (markers.py, docs/architecture.md §3): one of the two, or neither
    ready_suffix: str = ""                      # upload x once x + ready_suffix exists
    ready_file: str = ""                        # upload a folder's files once this file is in it; it goes last
    upload_markers: bool = False                # with ready_suffix: upload the markers too (after their file)
    prune_empty_dirs: bool = False              # after delete/move: remove folders the action left empty
    prune_min_age: float = Field(60.0, ge=0)    # seconds a folder must have been empty first

    @field_validator("temp_names")
    @classmethod
    def _temp_names(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for rule in v or ():
            if not rule or "/" in rule:
                raise ValueError(f"{rule!r}: each entry is a built-in rule ({', '.join(TEMP_RULES)}) or a glob "
                                 f"for a file name (no '/'), e.g. \"*.partial\"")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v.startswith(("/", "\\")):
            raise ValueError("must not start with '/' or '\\' (OSS keys cannot)")
        # a URL with "." / ".." / "//" segments resolves to another key than the one uploaded
        bad = [seg for seg in v.removesuffix("/").split("/") if seg in ("", ".", "..")] if v else []
        if bad:
            raise ValueError(f"{v!r} has an empty, '.' or '..' segment; write plain folder names "
                             f"such as \"photos/2024/\"")
        return v

    @field_validator("ready_suffix", "ready_file")
    @classmethod
    def _marker_name(cls, v: str, info: ValidationInfo) -> str:
        if not v:
            return v
        if v != v.strip() or v in (".", "..") or _CTL.search(v) or any(c in v for c in "/\\*?["):
            example = "\".done\"" if info.field_name == "ready_suffix" else "\"_SUCCESS\""
            raise ValueError(f"{v!r} is not a plain file name part (no '/', glob characters, spaces at the ends "
                             f"or control characters); write e.g. {example}")
        return v

    @model_validator(mode="after")
    def _move(self) -> "WatchConfig":
        if self.after_upload == "move" and self.move_to is None:
            raise ValueError("move_to: required with after_upload = \"move\"")
        if self.after_upload != "move" and self.move_to is not None:
            raise ValueError(f"move_to: only used with after_upload = \"move\" (after_upload is "
                             f"\"{self.after_upload}\"); set after_upload = \"move\" or remove move_to")
        return self

    @model_validator(mode="after")
    def _markers(self) -> "WatchConfig":
        if self.ready_suffix and self.ready_file:
            raise ValueError("ready_suffix/ready_file: set one of them, not both (a per-file marker, or one "
                             "sentinel file per folder)")
        if self.upload_markers and not self.ready_suffix:
            raise ValueError("upload_markers: only used with ready_suffix (a ready_file sentinel is always "
                             "uploaded, last); set ready_suffix or remove upload_markers")
        sample = f"file{self.ready_suffix}" if self.ready_suffix else self.ready_file
        key = "ready_suffix" if self.ready_suffix else "ready_file"
        if sample and is_excluded(sample, self.exclude):
            raise ValueError(f"{key}: {sample!r} matches exclude, so markers would never be seen; "
                             f"narrow exclude or pick another {key}")
        rule = temp_rule(sample, self.temp_names) if sample else None
        if rule is not None:
            raise ValueError(f"{key}: {sample!r} matches the temp_names rule {rule!r}, so markers would never "
                             f"be seen; pick another {key} or change temp_names")
        return self

    @model_validator(mode="after")
    def _prune(self) -> "WatchConfig":
        if self.prune_empty_dirs and self.after_upload == "keep":
            raise ValueError("prune_empty_dirs: only used with after_upload = \"delete\" or \"move\" (with keep "
                             "no folder is ever emptied); set one of those or remove prune_empty_dirs")
        if "prune_min_age" in self.model_fields_set and not self.prune_empty_dirs:
            raise ValueError("prune_min_age: only used with prune_empty_dirs = true; set that or remove "
                             "prune_min_age")
        return self


class DaemonConfig(_Section):
    rescan_interval: float = Field(300.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    orphan_max_age: float = Field(86400.0, ge=0)
    orphan_sweep_interval: float = Field(3600.0, gt=0)


def parse_listen(value: str) -> tuple[str, int]:
    """"127.0.0.1:9464" / "[::1]:9464" -> (host, port); port 0 picks a free one."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} is not HOST:PORT; write e.g. \"127.0.0.1:9464\" (port 0 picks a free one)")
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")):
            raise ValueError(f"{value!r}: unbalanced [ ] around the IPv6 address")
        host = host[1:-1]
    return host, int(port)


class MetricsConfig(_Section):
    listen: str = ""          # HOST:PORT for the Prometheus endpoint; empty = off

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v.strip():
            parse_listen(v)
        return v.strip()


EVENT_KINDS = ("uploaded", "failed", "skipped", "gone", "callback_failed")   # state.EVENT_KINDS


class HookConfig(_Section):
    """One [[hook]]: which events (on, watch, match) go where (command or url). README
    "Events and hooks"; delivery in events.py."""

    index: int = 0
    name: str = ""                           # default hook[INDEX]; names the deliveries in `ossyncd events`
    on: tuple[str, ...]
    watch: Path | None = None
    match: str = ""                          # a glob on the path relative to its watch root
    command: tuple[str, ...] = ()
    url: str = ""
    secret: str = Field("", repr=False)
    timeout: float = Field(10.0, gt=0)
    max_age: float = Field(86400.0, gt=0)    # seconds from the event to `dead`
    retry_backoff: float = Field(1.0, gt=0)
    retry_backoff_max: float = Field(300.0, gt=0)

    @field_validator("on")
    @classmethod
    def _on(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [k for k in v if k not in EVENT_KINDS]
        if bad or not v:
            raise ValueError(f"{', '.join(map(repr, bad)) or 'empty'}: list one or more of "
                             f"{', '.join(EVENT_KINDS)}, e.g. on = [\"uploaded\"]")
        return v

    @model_validator(mode="after")
    def _target(self) -> "HookConfig":
        if bool(self.command) == bool(self.url):
            raise ValueError("command/url: set exactly one: command = [\"/path/to/prog\", \"arg\"] (run "
                             "without a shell) or url = \"https://...\" (a JSON POST)")
        if self.url:
            _check_url("url", self.url, "write the http(s) URL that receives the JSON POST")
        if self.secret and not self.url:
            raise ValueError("secret: only used with url (it signs the POST); remove it")
        if self.command and not os.path.isabs(self.command[0]):
            raise ValueError(f"command: {self.command[0]!r} is not an absolute path; write the program's full "
                             f"path (no shell and no PATH search)")
        if self.watch is not None and not self.watch.is_absolute():
            raise ValueError(f"watch: {self.watch} is not absolute; write a [[watch]] path as configured")
        if not self.name:
            return self.model_copy(update={"name": f"hook[{self.index}]"})
        return self


class EventsConfig(_Section):
    concurrency: int = Field(4, ge=1, le=64)   # deliveries running at once, across every hook
    keep_delivered: float = Field(86400.0, ge=0)   # seconds a delivered event stays listed


class Config(_Section):
    oss: OssConfig
    credentials: CredentialsConfig = CredentialsConfig(source="default")   # [credentials] left out
    upload: UploadConfig = UploadConfig()
    object: ObjectSpec = ObjectSpec()       # [upload]'s object keys: for files outside every watch
    state: StateConfig = StateConfig()
    watch: tuple[WatchConfig, ...] = ()
    daemon: DaemonConfig = DaemonConfig()
    metrics: MetricsConfig = MetricsConfig()
    hook: tuple[HookConfig, ...] = ()
    events: EventsConfig = EventsConfig()
    source_path: Path | None = None

    @model_validator(mode="after")
    def _scoped_policy_fits(self) -> "Config":
        if self.credentials.source in _STS_CALLERS and self.credentials.scope_policy_to_prefixes:
            try:
                _policy.inline_policy_json(self.oss.bucket, self.prefixes, **self.policy_features)
            except _policy.PolicyError as e:
                raise ValueError(f"credentials.scope_policy_to_prefixes: {e}") from None
        return self

    @property
    def watches(self) -> tuple[WatchConfig, ...]:
        return self.watch

    @property
    def policy_features(self) -> dict[str, bool]:
        """What the RAM policy must grant beyond plain uploads (policy.upload_policy's flags)."""
        specs = [w.object for w in self.watch] or [self.object]
        return {"tagging": any(s.tags for s in specs),
                "kms": any(s.server_side_encryption == "KMS" for s in specs),
                "read_back": any(s.overwrite != "allow" for s in specs)}

    @property
    def prefixes(self) -> list[str]:
        return sorted({w.prefix for w in self.watch}) or [""]


def find_config_path(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("OSSYNCD_CONFIG")
    return Path(env) if env else Path(DEFAULT_CONFIG_PATH)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _format(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = _loc(tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-")))))
        where = ".".join(x for x in (prefix, loc) if x)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against config/ossyncd.example.toml"
        elif e["type"] == "missing":
            msg = "required; add it"
        if re.match(r"^[a-z_]+(/[a-z_]+)?: ", msg):  # model-level message already names its key
            key, _, rest = msg.partition(": ")
            where, msg = ".".join(x for x in (where, key) if x), rest
        lines.append(f"{where}: {msg}" if where else msg)
    return "; ".join(lines)


def parse_config(data: dict, source_path: Path | None = None, *, watch_dirs_must_exist: bool = True,
                 credentials_needed: bool = True) -> Config:
    data = dict(data)
    creds = dict(data.get("credentials") or {})
    for key, env in (("access_key_id", "OSSYNCD_ACCESS_KEY_ID"), ("access_key_secret", "OSSYNCD_ACCESS_KEY_SECRET")):
        if not creds.get(key) and os.environ.get(env):
            creds[key] = os.environ[env]
    if "credentials" in data or creds:
        data["credentials"] = creds
    watches = data.get("watch") or []
    if not isinstance(watches, list):
        raise ConfigError("watch: must be an array of tables; write [[watch]] sections")
    data["watch"] = [dict(w, index=i) if isinstance(w, dict) else w for i, w in enumerate(watches)]
    _resolve_object_specs(data)
    hooks = data.get("hook") or []
    if not isinstance(hooks, list):
        raise ConfigError("hook: must be an array of tables; write [[hook]] sections")
    data["hook"] = [dict(h, index=i) if isinstance(h, dict) else h for i, h in enumerate(hooks)]
    data["source_path"] = source_path
    from_broker = isinstance(data.get("credentials"), dict) and data["credentials"].get("source") == "broker"
    if from_broker:
        data.setdefault("oss", {})
    try:
        cfg = Config.model_validate(data, context={"credentials_needed": credentials_needed,
                                                   "oss_from_broker": from_broker})
    except ValidationError as e:
        raise ConfigError(_format(e)) from None
    _check_paths(cfg, watch_dirs_must_exist)
    _check_callback_timeout(cfg)
    return cfg


def _check_callback_timeout(cfg: Config) -> None:
    """OSS answers a write with a callback only after the application server did (or its 5 s
    per URL ran out); a client that gave up sooner would send the file again
    (docs/wire-protocol.md §9)."""
    urls = max((len(s.callback_url) for s in [cfg.object, *(w.object for w in cfg.watch)]), default=0)
    need = _spec.CALLBACK_TIMEOUT * urls + _spec.CALLBACK_READ_MARGIN
    if urls and cfg.oss.read_timeout < need:
        raise ConfigError(f"oss.read_timeout: {cfg.oss.read_timeout:g} s is too short with {urls} callback_url(s): "
                          f"OSS waits up to {_spec.CALLBACK_TIMEOUT:g} s for each before it answers, and a client "
                          f"that gives up sends the file again; set read_timeout to at least {need:g}")


def _resolve_object_specs(data: dict) -> None:
    """Move the object keys out of [upload] and each [[watch]] into one resolved ObjectSpec per
    watch, validated where they were written (errors name `upload.KEY` or `watch[N].KEY`)."""
    upload = data.get("upload")
    if not isinstance(upload, dict):
        return
    upload = data["upload"] = dict(upload)
    defaults = {k: upload.pop(k) for k in OBJECT_KEYS if k in upload}
    data["object"] = _object_spec(defaults, "upload", set(defaults))
    for w in data["watch"]:
        if not isinstance(w, dict):
            continue
        own = {k: w.pop(k) for k in OBJECT_KEYS if k in w}
        merged = dict(defaults)
        for k, v in own.items():
            merged[k] = {**defaults[k], **v} if k in _TABLES and isinstance(v, dict) and isinstance(
                defaults.get(k), dict) else v
        w["object"] = _object_spec(merged, f"watch[{w['index']}]", set(own)) if own else data["object"]


def _object_spec(raw: dict, where: str, own: set[str]) -> ObjectSpec:
    """`own`: the keys written in that section (the rest are inherited from [upload])."""
    try:
        return ObjectSpec.model_validate(raw, context={"own": own})
    except ValidationError as e:
        raise ConfigError(_format(e, where)) from None


def _check_paths(cfg: Config, watch_dirs_must_exist: bool = True) -> None:
    for w in cfg.watch:
        where = f"watch[{w.index}]"
        if not w.path.is_absolute():
            raise ConfigError(f"{where}.path: {w.path} is not absolute; write the full path")
        if watch_dirs_must_exist and not w.path.is_dir():
            raise ConfigError(f"{where}.path: {w.path} does not exist or is not a directory; create it or fix the path")
        if w.move_to is not None and not w.move_to.is_absolute():
            raise ConfigError(f"{where}.move_to: {w.move_to} is not absolute; write the full path")
    _check_roots(cfg.watch)
    _check_prefixes(cfg.watch)
    _check_hooks(cfg)
    parent = cfg.state.path.parent
    if not cfg.state.path.is_absolute():
        raise ConfigError(f"state.path: {cfg.state.path} is not absolute; write the full path")
    if not parent.is_dir():
        raise ConfigError(f"state.path: directory {parent} does not exist; create it (systemd's StateDirectory= does)")


def _check_hooks(cfg: Config) -> None:
    roots = {str(w.path) for w in cfg.watch}
    names: dict[str, int] = {}
    for h in cfg.hook:
        if h.watch is not None and str(h.watch) not in roots:
            raise ConfigError(f"hook[{h.index}].watch: {h.watch} is not a [[watch]] path; write one of "
                              f"{', '.join(sorted(roots)) or '(no watch configured)'} or remove the key")
        if h.name in names:
            raise ConfigError(f"hook[{h.index}].name: {h.name!r} is already used by hook[{names[h.name]}]; "
                              f"give each hook its own name")
        names[h.name] = h.index


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _check_roots(watches: tuple[WatchConfig, ...]) -> None:
    """Roots must not nest and move_to must not feed a watch: resolved paths, since a
    symlink alias is the same folder (a nested root flips a file between two keys)."""
    real = {w.index: os.path.realpath(w.path) for w in watches}
    for w in watches:
        where = f"watch[{w.index}]"
        for other in watches:
            if other.index < w.index and real[w.index] == real[other.index]:
                raise ConfigError(f"{where}.path: {w.path} is already watched by watch[{other.index}] "
                                  f"({other.path}); remove one")
            if real[w.index] != real[other.index] and _inside(real[w.index], real[other.index]):
                raise ConfigError(f"{where}.path: {w.path} lies inside watch[{other.index}].path {other.path}; "
                                  f"its files would be uploaded twice under two keys - remove one watch, or "
                                  f"exclude the subfolder from watch[{other.index}]")
        if w.after_upload != "move" or w.move_to is None:
            continue
        dest = os.path.realpath(w.move_to)
        if dest == real[w.index]:
            raise ConfigError(f"{where}.move_to: must differ from the watch path; choose another folder")
        for other in watches:
            if other.index != w.index and (_inside(dest, real[other.index]) or _inside(real[other.index], dest)):
                raise ConfigError(f"{where}.move_to: {w.move_to} overlaps watch[{other.index}].path {other.path}; "
                                  f"moved files would be uploaded again - choose a folder outside every watch")


def _folder(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _check_prefixes(watches: tuple[WatchConfig, ...]) -> None:
    """Key spaces must not overlap, or one watch's file silently replaces another's object."""
    for n, w in enumerate(watches):
        mine = _folder(w.prefix)
        for other in watches[:n]:
            theirs = _folder(other.prefix)
            if mine == theirs:
                raise ConfigError(f"watch[{w.index}].prefix \"{w.prefix}\" is already used by watch[{other.index}]; "
                                  "give each watch its own prefix (e.g. \"cam1/\" and \"cam2/\")")
            if mine.startswith(theirs) or theirs.startswith(mine):
                raise ConfigError(f"watch[{w.index}].prefix \"{w.prefix}\" overlaps watch[{other.index}].prefix "
                                  f"\"{other.prefix}\" (one contains the other, so keys can collide); "
                                  f"use prefixes where neither starts with the other")


def require_watches(cfg: Config) -> None:
    """`run` with no [[watch]] would sit idle for ever; `upload` needs none."""
    if not cfg.watch:
        where = cfg.source_path or "the config"
        raise ConfigError(f"{where}: no [[watch]] section, so `ossyncd run` would upload nothing; add a [[watch]] "
                          f"with path and prefix (see config/ossyncd.example.toml), or use `ossyncd upload FILE...`")


def load_config(path: str | os.PathLike | None = None, *, watch_dirs_must_exist: bool = True,
                credentials_needed: bool = True) -> Config:
    """``watch_dirs_must_exist=False`` for read-only views (`status`, `list`): they must work
    exactly when a watch folder has vanished. ``credentials_needed=False`` for commands that
    only touch the state DB: they run as the service user, without credentials.env."""
    p = find_config_path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found; pass -c PATH, set OSSYNCD_CONFIG, "
                          f"or create {DEFAULT_CONFIG_PATH} from config/ossyncd.example.toml") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse_config(data, source_path=p.resolve(), watch_dirs_must_exist=watch_dirs_must_exist,
                        credentials_needed=credentials_needed)


def secret_file_warning(cfg: Config) -> str | None:
    """A warning when the config file holds a secret and group/others can read it."""
    c = cfg.credentials
    hook_secret = any(h.secret for h in cfg.hook)
    if cfg.source_path is None or not (c.access_key_secret or c.security_token or c.broker_token or hook_secret):
        return None
    try:
        raw = cfg.source_path.read_text(encoding="utf-8", errors="replace")
        mode = cfg.source_path.stat().st_mode
    except OSError:
        return None
    # [[hook]] secret too: it signs the webhooks, so whoever reads it can forge them
    if not re.search(r"^\s*(access_key_secret|security_token|broker_token|secret)\s*=\s*\"[^\"]+\"", raw, re.M):
        return None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return (f"{cfg.source_path} holds a secret and is readable by group/others "
                f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {cfg.source_path}")
    return None
