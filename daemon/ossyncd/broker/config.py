"""broker.toml: ``[broker]``, ``[credentials]`` (the broker's own identity, any source, the
daemon's keys and checks) and ``[oss]`` (what hosts are told). Errors name the key and the fix."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ossyncd.config import CredentialsConfig, OssConfig, _format, parse_listen
from ossyncd.errors import ConfigError

DEFAULT_BROKER_CONFIG = "/etc/ossyncd/broker.toml"
ROLE_ARN_RE = re.compile(r"^acs:ram::\d+:role/[A-Za-z0-9.@_-]+$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerSection(_Section):
    listen: str = "127.0.0.1:8470"        # HOST:PORT, or an absolute unix socket path
    role_arn: str = ""                    # the uploader role clients get (add-client --role overrides)
    state: Path = Path("/var/lib/ossyncd-broker/broker.db")
    tls_cert: str = ""
    tls_key: str = Field("", repr=False)
    max_duration: int = Field(3600, ge=1, le=43200)
    rate_limit: float = Field(80.0, gt=0)          # AssumeRole calls per second, all clients
    client_rate_limit: float = Field(5.0, gt=0)    # requests per second per client
    audit_log: str = ""                            # default: audit.jsonl beside state
    list_prefix_condition: bool = True             # narrow ListMultipartUploads by oss:Prefix
    log_level: str = "info"

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        v = v.strip()
        if v.startswith("/"):
            return v
        try:
            parse_listen(v)
        except ValueError as e:
            raise ValueError(f"{e}, or an absolute unix socket path") from None
        return v

    @field_validator("role_arn")
    @classmethod
    def _role(cls, v: str) -> str:
        if v and not ROLE_ARN_RE.match(v):
            raise ValueError(f"{v!r} is not a role ARN; write acs:ram::<account id>:role/<name>")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v not in ("debug", "info", "warning", "error"):
            raise ValueError(f"{v!r}: use debug, info, warning or error")
        return v

    @model_validator(mode="after")
    def _tls(self) -> "BrokerSection":
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert/tls_key: set both (a PEM certificate chain and its key) or neither")
        return self

    @property
    def unix_socket(self) -> bool:
        return self.listen.startswith("/")

    @property
    def audit_path(self) -> Path:
        return Path(self.audit_log) if self.audit_log else self.state.with_name("audit.jsonl")

    def check_plain_http(self) -> None:
        """Plain HTTP only where nothing but this host can listen in: loopback or a unix socket."""
        if self.tls_cert or self.unix_socket:
            return
        host, _ = parse_listen(self.listen)
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"broker.listen: {self.listen!r} would serve tokens over plain HTTP on a "
                              "non-loopback address; set broker.tls_cert and broker.tls_key, or listen on "
                              "127.0.0.1 / a unix socket behind a TLS reverse proxy")


class BrokerOss(_Section):
    """Defaults handed to hosts (Bucket, Region, Endpoint in every answer)."""

    endpoint: str = ""
    bucket: str = ""
    region: str = ""

    @model_validator(mode="after")
    def _check(self) -> "BrokerOss":
        if self.endpoint or self.bucket:   # the daemon's own checks, so a host can use them as they are
            OssConfig(endpoint=self.endpoint or "https://oss.aliyuncs.com", bucket=self.bucket or "bkt",
                      region=self.region, signature="v1")
        return self


class BrokerConfig(_Section):
    broker: BrokerSection = Field(default_factory=BrokerSection)
    credentials: CredentialsConfig = Field(default_factory=lambda: CredentialsConfig(source="default"))
    oss: BrokerOss = Field(default_factory=BrokerOss)
    source_path: Path | None = None

    @model_validator(mode="after")
    def _paths(self) -> "BrokerConfig":
        if not self.broker.state.is_absolute():
            raise ValueError(f"broker.state: {self.broker.state} is not absolute; write the full path")
        return self


def find_broker_config(explicit: str | os.PathLike | None) -> Path:
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("OSSYNCD_BROKER_CONFIG") or DEFAULT_BROKER_CONFIG)


def load_broker_config(path: str | os.PathLike | None = None, *, credentials_needed: bool = True) -> BrokerConfig:
    """``credentials_needed=False`` for the registry commands (add-client, status, ...), which
    run without the broker's own key."""
    p = find_broker_config(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: broker config not found; pass -c PATH, set OSSYNCD_BROKER_CONFIG, or "
                          f"create {DEFAULT_BROKER_CONFIG} from config/broker.example.toml") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the broker config: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    data["source_path"] = p.resolve()
    creds = dict(data.get("credentials") or {"source": "default"})
    for key, env in (("access_key_id", "OSSYNCD_ACCESS_KEY_ID"), ("access_key_secret", "OSSYNCD_ACCESS_KEY_SECRET")):
        if not creds.get(key) and os.environ.get(env):
            creds[key] = os.environ[env]
    data["credentials"] = creds
    try:
        cfg = BrokerConfig.model_validate(data, context={"credentials_needed": credentials_needed})
    except ValidationError as e:
        raise ConfigError(f"{p}: {_format(e)}") from None
    if not cfg.broker.state.parent.is_dir():
        raise ConfigError(f"broker.state: directory {cfg.broker.state.parent} does not exist; create it "
                          "(systemd's StateDirectory= does)")
    return cfg
