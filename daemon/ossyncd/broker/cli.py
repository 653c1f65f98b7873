"""`ossyncd broker ...`: registered only when the broker command runs (cli.py), so the daemon's
commands never import this package. Commands and keys: docs/broker.md."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone

import click

from ossyncd import output
from ossyncd.errors import CommandFailed
from ossyncd.status import iso as iso8601

from .config import BrokerConfig, load_broker_config
from .registry import Client, Registry, check_name, check_prefix

SILENT_AFTER = 180.0    # a host with no heartbeat for longer than this is "silent"

config_option = click.option("-c", "--config", "config_path", metavar="PATH",
                             help="broker config (default: $OSSYNCD_BROKER_CONFIG, then /etc/ossyncd/broker.toml)")
json_option = click.option("--json", "as_json", is_flag=True, help="machine-readable output")


def _registry(config_path: str | None) -> tuple[BrokerConfig, Registry]:
    cfg = load_broker_config(config_path, credentials_needed=False)
    return cfg, Registry(cfg.broker.state)


@click.group()
def broker() -> None:
    """The fleet's STS broker: registered hosts get short-lived tokens for their own prefixes."""


@broker.command()
@config_option
def run(config_path):
    """Run the broker in the foreground (systemd runs this)."""
    from .server import run as run_broker
    sys.exit(run_broker(config_path))


@broker.command(name="add-client")
@config_option
@click.argument("name")
@click.option("--bucket", default=None, help="the client's bucket (default: [oss] bucket)")
@click.option("--prefix", "prefixes", multiple=True, required=True, help="a key prefix it may write, e.g. site1/ "
              "(repeat for more)")
@click.option("--max-duration", type=click.IntRange(1, 43200), default=None,
              help="token lifetime cap in seconds (never above broker.max_duration)")
@click.option("--role", default=None, help="the role ARN to assume for it (default: broker.role_arn)")
def add_client(config_path, name, bucket, prefixes, max_duration, role):
    """Register NAME and print its token once (only its SHA-256 is stored)."""
    from ossyncd.config import OssConfig

    from .config import ROLE_ARN_RE
    cfg, reg = _registry(config_path)
    check_name(name)
    bucket = bucket or cfg.oss.bucket
    if not bucket:
        raise CommandFailed("--bucket", "required: pass --bucket or set [oss] bucket in the broker config", 2)
    try:
        OssConfig(endpoint="https://oss.aliyuncs.com", bucket=bucket, signature="v1")
    except ValueError as e:
        raise CommandFailed("--bucket", str(e).splitlines()[-1].strip(), 2) from None
    if role and not ROLE_ARN_RE.match(role):
        raise CommandFailed("--role", f"{role!r} is not a role ARN; write acs:ram::<account id>:role/<name>", 2)
    if not (role or cfg.broker.role_arn):
        raise CommandFailed("--role", "required: pass --role or set broker.role_arn in the broker config", 2)
    token = reg.add(name, bucket, [check_prefix(p) for p in prefixes], max_duration, role)
    output.note(f"client {name} registered for {bucket}/{', '.join(prefixes)}; its token (shown only now):")
    output.out.print(token)


@broker.command(name="remove-client")
@config_option
@click.argument("name")
def remove_client(config_path, name):
    """Unregister NAME: its next request gets 401. Tokens already issued live until they expire."""
    _, reg = _registry(config_path)
    reg.remove(name)
    output.note(f"client {name} removed; tokens already issued stay valid until they expire")


@broker.command(name="disable-client")
@config_option
@click.argument("name")
def disable_client(config_path, name):
    """Refuse NAME from its next request on (403), keeping its registration."""
    _, reg = _registry(config_path)
    reg.set_disabled(name, True)
    output.note(f"client {name} disabled; tokens already issued stay valid until they expire")


@broker.command(name="enable-client")
@config_option
@click.argument("name")
def enable_client(config_path, name):
    """Serve a disabled client again."""
    _, reg = _registry(config_path)
    reg.set_disabled(name, False)
    output.note(f"client {name} enabled")


@broker.command(name="rotate-token")
@config_option
@click.argument("name")
def rotate_token(config_path, name):
    """Give NAME a new token (printed once); the old one stops working at once."""
    _, reg = _registry(config_path)
    token = reg.rotate(name)
    output.note(f"client {name}: new token (shown only now); the old one no longer works:")
    output.out.print(token)


def _client_json(c: Client) -> dict:
    return {"name": c.name, "bucket": c.bucket, "prefixes": list(c.prefixes), "max_duration": c.max_duration,
            "role_arn": c.role_arn, "disabled": c.disabled, "created_at": iso8601(c.created_at),
            "last_issued_at": iso8601(c.last_issued_at), "last_expiry": iso8601(c.last_expiry),
            "last_access_key_id": c.last_key_id}


@broker.command(name="list-clients")
@config_option
@json_option
def list_clients(config_path, as_json):
    """Registered clients: bucket, prefixes, limits, disabled (never a token)."""
    _, reg = _registry(config_path)
    clients = [_client_json(c) for c in reg.clients()]
    if as_json:
        output.out.file.write(json.dumps(clients, indent=2) + "\n")
        return
    output.table(("name", "bucket", "prefixes", "max_duration", "role", "state"),
                 [(c["name"], c["bucket"], " ".join(c["prefixes"]), str(c["max_duration"] or ""), c["role_arn"] or "",
                   "disabled" if c["disabled"] else "enabled") for c in clients])


def fleet_status(reg: Registry, now: float) -> dict:
    """Every client with its hosts' last heartbeats; hosts silent for over SILENT_AFTER."""
    beats: dict[str, list[dict]] = {}
    for hb in reg.heartbeats():
        b = hb["body"]
        expiry = b.get("credential_expiry")
        try:
            expiry_ts = datetime.fromisoformat(expiry).astimezone(timezone.utc).timestamp() if expiry else None
        except (TypeError, ValueError):
            expiry_ts = None
        beats.setdefault(hb["client"], []).append({
            "host": hb["host"], "last_seen": iso8601(hb["received_at"]), "age_seconds": round(now - hb["received_at"], 1),
            "silent": now - hb["received_at"] > SILENT_AFTER, "version": b.get("version"), "states": b.get("states", {}),
            "queue": b.get("queue"), "failures": b.get("failures"), "last_upload": b.get("last_upload"),
            "credential_expiry": iso8601(expiry_ts) if expiry_ts else expiry, "remote": hb["remote"]})
    clients = []
    for c in reg.clients():
        hosts = beats.get(c.name, [])
        clients.append({**_client_json(c), "hosts": hosts,
                        "last_seen": max((h["last_seen"] for h in hosts), default=None),
                        "silent_hosts": [h["host"] for h in hosts if h["silent"]]})
    return {"clients": clients, "silent_after_seconds": SILENT_AFTER,
            "silent_hosts": [f"{c['name']}/{h}" for c in clients for h in c["silent_hosts"]]}


@broker.command()
@config_option
@json_option
def status(config_path, as_json):
    """The fleet: every client and host, last seen, state counts, failures, credential expiry,
    and hosts that went silent (no heartbeat for over 3 minutes)."""
    _, reg = _registry(config_path)
    d = fleet_status(reg, time.time())
    if as_json:
        output.out.file.write(json.dumps(d, indent=2) + "\n")
        return
    rows = []
    for c in d["clients"]:
        state = "disabled" if c["disabled"] else "enabled"
        if not c["hosts"]:
            rows.append((c["name"], "-", state, "never", "", "", "", c["last_expiry"] or ""))
        for h in c["hosts"]:
            counts = " ".join(f"{k}={v}" for k, v in sorted(h["states"].items()))
            rows.append((c["name"], h["host"], state + (" SILENT" if h["silent"] else ""), h["last_seen"] or "",
                         counts, str(h["queue"]), str(h["failures"]), h["credential_expiry"] or ""))
    output.table(("client", "host", "state", "last seen", "counts", "queue", "failures", "expiry"), rows)
    if d["silent_hosts"]:
        output.report("silent:", ", ".join(d["silent_hosts"]) + " (no heartbeat for over 3 minutes)", style="yellow")
