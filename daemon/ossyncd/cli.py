"""The `ossyncd` command: parsing and printing only; the work lives in the modules."""

from __future__ import annotations

import json
import os
import sys
import threading

import click

from ossyncd import log as logsetup
from ossyncd import output
from ossyncd.config import Config, load_config
from ossyncd.errors import CommandFailed, CredentialsError, OssyncdError
from ossyncd.output import note, out, report

config_option = click.option("-c", "--config", "config_path", metavar="PATH",
                             help="config file (default: $OSSYNCD_CONFIG, then /etc/ossyncd/ossyncd.toml)")


def _load(config_path: str | None, *, watch_dirs_must_exist: bool = True, credentials_needed: bool = True) -> Config:
    return load_config(config_path, watch_dirs_must_exist=watch_dirs_must_exist, credentials_needed=credentials_needed)


def _load_local(config_path: str | None, *, watch_dirs_must_exist: bool = True) -> Config:
    """For commands on the state DB alone, run as the service user: no credentials needed."""
    return _load(config_path, watch_dirs_must_exist=watch_dirs_must_exist, credentials_needed=False)


def _open_state(cfg: Config, *, readonly: bool):
    from ossyncd.state import State
    if readonly and not cfg.state.path.exists():
        return None
    state = State(cfg.state.path, readonly=readonly)
    if readonly and state.schema == 0:   # created, never migrated: no rows yet
        state.close()
        return None
    return state


_NO_SDK = {"status", "list", "policy", "state", "broker"}   # `broker run` sets up its own logging


class _Main(click.Group):
    # `broker` is loaded only when it runs: the daemon's commands never import the broker package
    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), "broker"])

    def get_command(self, ctx, name):
        if name == "broker":
            from ossyncd.broker.cli import broker
            return broker
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OssyncdError as e:   # the one place an error becomes `label: message` and an exit code
            report(f"{e.label}:", str(e))
            sys.exit(e.exit_code)


def entry() -> None:
    """The process (`ossyncd`, `python -m ossyncd`): main(), then a quick exit. Tearing down
    the ~700 modules a command imports costs 0.15-0.2 s after its answer is out, and nothing
    needs it: each command has closed its state DB, joined its threads and written its
    output; an exception other than an exit still ends the normal way, with its traceback."""
    try:
        main()
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    if isinstance(code, str):   # click does not do this, but sys.exit("message") means 1
        print(code, file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):   # a closed pipe (`| head`): the answer is as far as it got
        code = code or 1
    os._exit(code or 0)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ossyncd")
def main() -> None:
    """ossyncd: upload finished files from drop folders to Alibaba Cloud OSS."""
    # stdout is each command's answer (`url --sign | xargs curl`) and each command reports its
    # own outcome in one line, so the library's log lines stay quiet; `run` (to stdout, for
    # journald) and `upload` configure their own logging. The read-only commands load no SDK
    # and leave structlog unimported until something logs (log.get_logger: the same quiet setup).
    if click.get_current_context().invoked_subcommand not in _NO_SDK:
        logsetup.configure("critical", "auto", stream=sys.stderr)


@main.command()
@config_option
@click.option("--prefix", default=None, help="key prefix for files outside every watch folder")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, readable=False))
def upload(config_path, prefix, files):
    """Upload FILES now, with progress bars, through the same stack and state as the daemon.

    Exits 0 only if every file is in OSS and verified. Files already uploaded and
    unchanged are not sent again.
    """
    from ossyncd.errors import FileProblem
    from ossyncd.stack import Hooks, Stack
    from ossyncd.status import url_or_error

    cfg = _load(config_path)
    logsetup.configure(cfg.daemon.log_level, "console" if sys.stderr.isatty() else "json", stream=sys.stderr)
    logsetup.register_secrets([cfg.credentials.access_key_secret, cfg.credentials.security_token,
                               cfg.credentials.broker_token])
    progress = output.progress()
    tasks: dict[int, int] = {}
    done_bytes: dict[int, int] = {}
    lock = threading.Lock()

    def on_progress(file_id: int, done: int, total: int) -> None:
        with lock:
            done_bytes[file_id] = done
            if file_id in tasks:
                progress.update(tasks[file_id], completed=done)
            progress.update(total_task, completed=sum(done_bytes.values()))

    stack = Stack(cfg, Hooks(on_progress=on_progress))
    # one writer per DB: racing the daemon on a file could record a correct object as failed
    stack.state.acquire_daemon_lock(hint="drop the files into one of its watch folders, or stop it "
                                          "and run `ossyncd upload` again")
    stack.credentials.start()  # rotate at ~80% of the lifetime, as the daemon does
    failed = 0
    rows = []
    with progress:
        total_task = progress.add_task("total", total=0)
        for name in files:
            try:
                row, todo = stack.enqueue(os.path.abspath(name), prefix)
            except FileProblem as e:
                report(f"{name}:", e.detail)
                failed += 1
                continue
            if not todo:
                note(f"{name}: already uploaded and unchanged, nothing to do: {row.url}")
                continue
            rows.append(row)
            tasks[row.id] = progress.add_task(os.path.basename(name), total=row.size)
            progress.update(total_task, total=progress.tasks[total_task].total + row.size)

        def one(row):
            return stack.upload_now(row, lambda new: progress.update(tasks[new.id], total=new.size))

        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(cfg.upload.max_files_in_flight) as pool:
            results = list(pool.map(one, rows))
    for row, outcome in results:
        if outcome.state == "done":   # in OSS and verified; a failed upload callback does not undo that
            done = stack.state.get_by_id(row.id)
            report("done", f"{row.path} -> {url_or_error(done)}", style="yellow" if done.callback == "failed" else "green")
        else:
            failed += 1
            report(outcome.state, f"{row.path}: {outcome.error}")
    stack.close()
    sys.exit(1 if failed else 0)


@main.command()
@config_option
@click.option("--sign", is_flag=True, help="print a signed GET URL instead of the recorded one")
@click.option("--expires", default=3600, show_default=True, help="signed URL lifetime in seconds")
@click.argument("path", type=click.Path())
def url(config_path, sign, expires, path):
    """Print the URL recorded for PATH (or a signed one)."""
    cfg = _load(config_path)
    state = _open_state(cfg, readonly=True)
    row = state.get(os.path.abspath(path)) if state else None
    if row is None or row.state != "done":
        raise CommandFailed(path, f"not uploaded yet (state: {row.state if row else 'unknown'}); see `ossyncd list`")
    if not sign:
        click.echo(row.url)
        return
    from ossyncd.stack import build_credentials, build_store
    click.echo(build_store(cfg, build_credentials(cfg)).signed_url(row.key, expires))


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(config_path, as_json):
    """What the daemon is doing: counts, uploads in flight, failures, credentials."""
    from ossyncd.status import render_status, status_dict
    cfg = _load_local(config_path, watch_dirs_must_exist=False)   # a vanished watch folder is what it must show
    state = _open_state(cfg, readonly=True)
    d = status_dict(cfg, state)
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        render_status(d, out)


@main.command(name="list")
@config_option
@click.option("--state", "state_filter", default=None, help="only files in this state (done, failed, ...)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def list_files(config_path, state_filter, as_json):
    """Files with their state, size, key, URL or error. Piped, one tab-separated line per file
    under a header, with whole values (tabs and line breaks in names written as \\t, \\n)."""
    from ossyncd.status import file_json, render_list
    cfg = _load_local(config_path, watch_dirs_must_exist=False)
    state = _open_state(cfg, readonly=True)
    files = state.files(state_filter) if state else []
    if as_json:
        click.echo(json.dumps([file_json(f) for f in files], indent=2))
    else:
        render_list(files, out)


@main.command()
@config_option
@click.argument("path", required=False, type=click.Path())
def retry(config_path, path):
    """Move failed files (or one PATH) back to the queue."""
    cfg = _load_local(config_path)
    state = _open_state(cfg, readonly=False)
    n = state.requeue(os.path.abspath(path) if path else None)
    click.echo(f"{n} file(s) queued again")


@main.group(invoke_without_command=True)
@config_option
@click.option("--state", "state_filter", type=click.Choice(["pending", "dead", "delivered"]), default=None,
              help="only deliveries in this state")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def events(ctx, config_path, state_filter, as_json):
    """Hook deliveries from the outbox: one line per event and hook (id, event id, state,
    attempts, last error). `ossyncd events retry [ID]` re-queues dead ones."""
    if ctx.invoked_subcommand is not None:
        return
    from ossyncd.status import event_json, render_events
    cfg = _load(config_path, watch_dirs_must_exist=False)
    state = _open_state(cfg, readonly=True)
    rows = state.events(state_filter) if state else []
    if as_json:
        click.echo(json.dumps([event_json(e) for e in rows], indent=2))
    else:
        render_events(rows, out)


@events.command(name="retry")
@config_option
@click.argument("row_id", metavar="[ID]", required=False, type=int)
def events_retry(config_path, row_id):
    """Re-queue dead deliveries (all, or the one with ID from `ossyncd events`), with a fresh max_age."""
    cfg = _load(config_path, watch_dirs_must_exist=False)
    state = _open_state(cfg, readonly=False)
    n = state.retry_events(row_id)
    if row_id is not None and n == 0:
        raise CommandFailed(f"event {row_id}", "no dead delivery with this id; see `ossyncd events --state dead`")
    click.echo(f"{n} event delivery(ies) queued again")


@main.command()
@config_option
@click.option("--rrsa", is_flag=True, help="print the RAM role's trust policy for ACK RRSA instead")
@click.option("--oidc-provider-arn", default="", help="with --rrsa: the cluster's OIDC provider ARN")
@click.option("--oidc-issuer", default="", help="with --rrsa: the cluster's OIDC issuer URL")
@click.option("--namespace", default="default", show_default=True, help="with --rrsa: the pod's namespace")
@click.option("--service-account", default="ossyncd", show_default=True,
              help="with --rrsa: the pod's service account")
def policy(config_path, rrsa, oidc_provider_arn, oidc_issuer, namespace, service_account):
    """Print the least-privilege RAM policy for this bucket and these prefixes (or, with --rrsa,
    the trust policy that lets a pod's service account assume the role)."""
    from ossyncd.policy import rrsa_trust_policy, upload_policy
    if rrsa:
        if not (oidc_provider_arn and oidc_issuer):
            raise click.UsageError("--rrsa needs --oidc-provider-arn and --oidc-issuer (the cluster's RRSA "
                                   "settings in the ACK console)")
        click.echo(json.dumps(rrsa_trust_policy(oidc_provider_arn, oidc_issuer, namespace, service_account),
                              indent=2))
        return
    cfg = _load(config_path)
    if cfg.credentials.source == "broker":   # the bucket may come from the broker (docs/broker.md)
        from ossyncd.stack import build_credentials, with_broker_oss
        logsetup.configure("critical", "auto", stream=sys.stderr)   # stdout is the policy alone
        creds = build_credentials(cfg)
        try:
            cfg = with_broker_oss(cfg, creds)
        except CredentialsError as e:
            raise CommandFailed(f"credentials ({creds.describe()})", str(e), e.exit_code) from None
    click.echo(json.dumps(upload_policy(cfg.oss.bucket, cfg.prefixes, **cfg.policy_features), indent=2))


@main.command(name="check-config")
@config_option
def check_config(config_path):
    """Validate the config, then obtain credentials once and reach the endpoint."""
    from ossyncd.config import secret_file_warning
    from ossyncd.errors import StoreError
    from ossyncd.stack import build_credentials, build_store, with_broker_oss
    cfg = _load(config_path)
    creds = build_credentials(cfg)
    try:
        cfg = with_broker_oss(cfg, creds)   # source = "broker": [oss] completed from its answer
    except CredentialsError as e:
        raise CommandFailed(f"credentials ({creds.describe()})", str(e), e.exit_code) from None
    click.echo(f"config {cfg.source_path}: valid ({len(cfg.watch)} watch folder(s), bucket {cfg.oss.bucket})")
    warning = secret_file_warning(cfg)
    if warning:
        report("warning:", warning, style="yellow")
    try:
        snap = creds.current()
        click.echo(f"credentials ({creds.describe()}): ok"
                   + (f", expire {creds.status().get('expires_at')}" if snap.expires_at else ""))
        store = build_store(cfg, creds)
        store.list_uploads(cfg.prefixes[0])
        click.echo(f"endpoint {cfg.oss.endpoint}: ok (bucket {cfg.oss.bucket} reachable, ListMultipartUploads allowed)")
        # Try what a policy governs per prefix: start and abort a multipart upload of a probe key
        # (allowed by the upload-only policy; no object is ever written).
        for prefix in cfg.prefixes:
            probe = f"{prefix}.ossyncd-check-{os.urandom(4).hex()}"
            try:
                store.abort(probe, store.init_multipart(probe))
            except StoreError as e:
                if e.code != "AccessDenied":
                    raise
                raise CommandFailed("permissions", f"{e.op} on probe key {probe!r} was refused (AccessDenied): "
                                    f"these credentials may not upload under watch prefix {prefix!r}; compare "
                                    "the role's policy and any credentials.policy with `ossyncd policy`") from None
        click.echo("uploads allowed under prefix(es) " + ", ".join(repr(p) for p in cfg.prefixes)
                   + " (probe: InitiateMultipartUpload + AbortMultipartUpload)")
    except CredentialsError as e:
        raise CommandFailed(f"credentials ({creds.describe()})", str(e), e.exit_code) from None
    except StoreError as e:
        raise CommandFailed(f"endpoint {cfg.oss.endpoint}", str(e), e.exit_code) from None


@main.command()
@config_option
def run(config_path):
    """Run the daemon in the foreground (systemd runs this)."""
    from ossyncd.signals import stop_on_signals
    stop = threading.Event()
    stop_on_signals(stop)   # before the daemon's imports
    from ossyncd.app import run as run_daemon
    sys.exit(run_daemon(config_path, stop))


def _set_paused(config_path, paused: bool) -> None:
    cfg = _load_local(config_path)
    state = _open_state(cfg, readonly=False)
    state.set_meta("paused", "1" if paused else None)
    running = state.lock_holder(cfg.state.path) is not None
    word = "paused" if paused else "resumed"
    if running:
        click.echo(f"{word}: the daemon applies it within 2 s"
                   + ("; in-flight parts are checkpointed" if paused else "; uploads continue from checkpoints"))
    else:
        click.echo(f"{word}: no daemon is running; it will start {word}")


@main.command()
@config_option
def pause(config_path):
    """Pause uploads on the running daemon (in-flight parts are checkpointed)."""
    _set_paused(config_path, True)


@main.command()
@config_option
def resume(config_path):
    """Resume uploads, continuing from checkpoints."""
    _set_paused(config_path, False)


@main.group(name="state")
def state_group():
    """Check the state DB, or move a damaged one aside (docs/state-recovery.md)."""


@state_group.command(name="check")
@config_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def state_check(config_path, as_json):
    """Check the state DB without writing to it (safe while the daemon runs): integrity_check,
    the schema against this ossyncd, rows in impossible states, the WAL. Exit 0 healthy, 1 damaged."""
    from ossyncd.state import check_db
    cfg = _load_local(config_path, watch_dirs_must_exist=False)
    d = check_db(cfg.state.path)
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        _render_check(d)
    sys.exit(1 if d["problems"] else 0)


def _render_check(d: dict) -> None:
    running = f"in use by ossyncd pid {d['daemon_pid']}" if d["daemon_pid"] else "no daemon running"
    out.print(output.styled(("state DB", "bold"), f" {d['path']}: {running}"))
    if d["size"] is not None:
        wal = f", WAL {d['wal_bytes']} bytes" if d["wal_bytes"] is not None else ", no WAL"
        integrity = {None: "not run", "ok": "ok"}.get(d["integrity"], "FAILED")
        out.print(output.styled(f"size {d['size']} bytes{wal}; schema {d['schema']} (this ossyncd: "
                                f"{d['schema_expected']}); integrity_check: {integrity}"))
    if d["counts"]:
        out.print(output.styled("files: " + ", ".join(f"{s} {n}" for s, n in sorted(d["counts"].items()))))
    for n in d["notes"]:
        out.print(output.styled(("note:", "yellow"), f" {n}"))
    for p in d["problems"]:
        out.print(output.styled(("problem:", "red"), f" {p}"))
    out.print(output.styled(("damaged", "red") if d["problems"] else ("ok", "green"),
                            " (see docs/state-recovery.md)" if d["problems"] else ""))


@state_group.command(name="rebuild")
@config_option
@click.option("--force", is_flag=True, help="also when `state check` finds the DB healthy")
def state_rebuild(config_path, force):
    """Move the state DB (and its -wal, -shm) aside and start an empty one; the daemon then
    re-checks every file against the bucket at its next start. Refused while the daemon runs."""
    from ossyncd.state import State, check_db, move_aside
    cfg = _load_local(config_path, watch_dirs_must_exist=False)
    path = cfg.state.path
    d = check_db(path)
    if not d["exists"]:
        raise CommandFailed(f"state DB {path}", "does not exist; nothing to rebuild (the daemon creates it)")
    if not d["problems"] and not force:
        raise CommandFailed(f"state DB {path}", "`ossyncd state check` finds it healthy; a rebuild makes the daemon "
                            "re-check every file against the bucket (see docs/state-recovery.md): add --force to "
                            "rebuild anyway")
    moved = move_aside(path)
    State(path).close()
    for m in moved:
        click.echo(f"moved aside: {m}")
    click.echo(f"new empty state DB: {path}; start ossyncd and it rescans every watch folder "
               "(what that costs: docs/state-recovery.md)")
