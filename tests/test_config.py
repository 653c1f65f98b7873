"""Config loading: the interface keys, sizes, and errors that name the key and the fix."""

import json
import subprocess
import sys
import textwrap

import pytest

from ossyncd.config import load_config, parse_size
from ossyncd.errors import ConfigError


def write(tmp_path, body: str):
    p = tmp_path / "ossyncd.toml"
    p.write_text(textwrap.dedent(body))
    return p


def base(tmp_path, extra: str = "", watch: str | None = None) -> str:
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    watch = watch if watch is not None else f'[[watch]]\npath = "{drop}"\nprefix = "incoming/"\n'
    return textwrap.dedent(f"""
        [oss]
        endpoint = "http://127.0.0.1:9000"
        bucket = "drop"
        region = "cn-hangzhou"
        [credentials]
        source = "static"
        access_key_id = "AKID"
        access_key_secret = "SECRET"
        [state]
        path = "{tmp_path / 'state.db'}"
        """) + extra + "\n" + watch


@pytest.mark.parametrize("text,expected", [
    ("8MiB", 8 * 1024**2), ("100KiB", 102400), ("1GiB", 1024**3), ("512", 512), (1234, 1234),
    ("1.5 MiB", int(1.5 * 1024**2)), ("0", 0),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["8 parsecs", "-1", "MiB", "", True])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_full_example_loads(tmp_path):
    cfg = load_config(write(tmp_path, base(tmp_path, '[upload]\nmultipart_threshold = "1MiB"\npart_size = "auto"\n')))
    assert cfg.upload.multipart_threshold == 1024**2
    assert cfg.upload.part_size is None
    assert cfg.watch[0].prefix == "incoming/" and cfg.watch[0].index == 0
    assert cfg.oss.signature == "v4"


def test_shipped_example_config_is_valid(tmp_path, monkeypatch):
    """config/ossyncd.example.toml documents every key; it must parse (paths swapped for tmp)."""
    import tomllib
    from pathlib import Path

    from ossyncd.config import parse_config
    data = tomllib.loads((Path(__file__).parent.parent / "config" / "ossyncd.example.toml").read_text())
    data["state"]["path"] = str(tmp_path / "state.db")
    for w in data["watch"]:
        w["path"] = str(tmp_path)
        w.pop("move_to", None)
        w["after_upload"] = "keep"
    monkeypatch.setenv("OSSYNCD_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("OSSYNCD_ACCESS_KEY_SECRET", "secret")
    parse_config(data)


@pytest.mark.parametrize("extra,watch,fragment", [
    ('[upload]\nmultipart_threshold = "8 parsecs"\n', None, "upload.multipart_threshold"),
    ('[upload]\npart_size = "10KiB"\n', None, "upload.part_size"),
    ('[upload]\nparalel_parts = 4\n', None, "upload.paralel_parts: unknown key"),
    ("", '[[watch]]\npath = "/nonexistent/drop"\n', "watch[0].path: /nonexistent/drop does not exist"),
    ("", '[[watch]]\npath = "relative/drop"\n', "watch[0].path"),
    ("", '[[watch]]\npath = "/tmp"\nafter_upload = "move"\n', "watch[0].move_to: required"),
    ("", '[[watch]]\npath = "/tmp"\nafter_upload = "shred"\n', "watch[0].after_upload"),
])
def test_errors_name_the_key(tmp_path, extra, watch, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, base(tmp_path, extra, watch)))
    assert fragment in str(e.value)


def test_sts_requires_role_and_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("OSSYNCD_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("OSSYNCD_ACCESS_KEY_SECRET", raising=False)
    text = base(tmp_path).replace('source = "static"', 'source = "sts"')
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert "credentials.role_arn: required" in str(e.value)


def test_keys_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSYNCD_ACCESS_KEY_ID", "ENVID")
    monkeypatch.setenv("OSSYNCD_ACCESS_KEY_SECRET", "ENVSECRET")
    text = base(tmp_path).replace('access_key_id = "AKID"\n', "").replace('access_key_secret = "SECRET"\n', "")
    cfg = load_config(write(tmp_path, text))
    assert cfg.credentials.access_key_id == "ENVID"


def test_v4_needs_region(tmp_path):
    text = base(tmp_path).replace('region = "cn-hangzhou"\n', "")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert "oss.region: required" in str(e.value)


def test_check_config_exits_2_on_bad_config(tmp_path):
    p = write(tmp_path, base(tmp_path, '[upload]\nparallel_parts = "many"\n'))
    r = subprocess.run([sys.executable, "-m", "ossyncd", "check-config", "-c", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "upload.parallel_parts" in r.stderr


def test_missing_config_file_says_what_to_do(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ossyncd", "status", "-c", str(tmp_path / "nope.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "config file not found" in r.stderr


# ---------------------------------------------------------------- key spaces and paths that collide

@pytest.mark.parametrize("prefix", ["../x/", "a/../b/", "./x/", "a/./b", "a//b/", "x//"])
def test_prefix_with_dot_or_empty_segments_is_refused(tmp_path, prefix):
    watch = f'[[watch]]\npath = "{tmp_path / "drop"}"\nprefix = "{prefix}"\n'
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, base(tmp_path, "", watch)))
    assert str(e.value).startswith("watch[0].prefix:") and "segment" in str(e.value)


@pytest.mark.parametrize("prefix", ["", "photos", "photos/", "a/b/c/", "x..y/", ".hidden/"])
def test_plain_prefixes_are_accepted(tmp_path, prefix):
    watch = f'[[watch]]\npath = "{tmp_path / "drop"}"\nprefix = "{prefix}"\n'
    assert load_config(write(tmp_path, base(tmp_path, "", watch))).watch[0].prefix == prefix


def two_watches(tmp_path, a: dict, b: dict) -> str:
    out = ""
    for w in (a, b):
        out += "[[watch]]\n" + "".join(f'{k} = "{v}"\n' for k, v in w.items())
    return out


@pytest.mark.parametrize("p0,p1,fragment", [
    ("photos/", "photos/", 'watch[1].prefix "photos/" is already used by watch[0]'),
    ("photos", "photos/", 'watch[1].prefix "photos/" is already used by watch[0]'),
    ("photos/", "photos/2024/", 'watch[1].prefix "photos/2024/" overlaps watch[0].prefix "photos/"'),
    ("photos/2024/", "photos/", 'watch[1].prefix "photos/" overlaps watch[0].prefix "photos/2024/"'),
    ("", "cam/", 'watch[1].prefix "cam/" overlaps watch[0].prefix ""'),
])
def test_overlapping_prefixes_are_refused(tmp_path, p0, p1, fragment):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    text = base(tmp_path, "", two_watches(tmp_path, {"path": tmp_path / "a", "prefix": p0},
                                          {"path": tmp_path / "b", "prefix": p1}))
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert fragment in str(e.value)


def test_distinct_prefixes_are_accepted(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # "cam1/" and "cam10/" share characters but not a folder
    text = base(tmp_path, "", two_watches(tmp_path, {"path": tmp_path / "a", "prefix": "cam1/"},
                                          {"path": tmp_path / "b", "prefix": "cam10/"}))
    assert [w.prefix for w in load_config(write(tmp_path, text)).watch] == ["cam1/", "cam10/"]


def test_nested_roots_are_refused_also_through_a_symlink(tmp_path):
    (tmp_path / "drop" / "sub").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "drop")
    for second, fragment in ((tmp_path / "drop" / "sub", "lies inside watch[0].path"),
                             (tmp_path / "alias" / "sub", "lies inside watch[0].path"),
                             (tmp_path / "alias", "is already watched by watch[0]")):
        text = base(tmp_path, "", two_watches(tmp_path, {"path": tmp_path / "drop", "prefix": "a/"},
                                              {"path": second, "prefix": "b/"}))
        with pytest.raises(ConfigError) as e:
            load_config(write(tmp_path, text))
        assert str(e.value).startswith("watch[1].path:") and fragment in str(e.value), second


def test_move_to_into_another_watch_or_its_own_root_is_refused(tmp_path):
    for d in ("a", "b/done"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "a")
    cases = [(tmp_path / "b", "overlaps watch[1].path"), (tmp_path / "b" / "done", "overlaps watch[1].path"),
             (tmp_path, "overlaps watch[1].path"), (tmp_path / "alias", "must differ from the watch path")]
    for move_to, fragment in cases:
        text = base(tmp_path, "", two_watches(
            tmp_path, {"path": tmp_path / "a", "prefix": "a/", "after_upload": "move", "move_to": move_to},
            {"path": tmp_path / "b", "prefix": "b/"}))
        with pytest.raises(ConfigError) as e:
            load_config(write(tmp_path, text))
        assert str(e.value).startswith("watch[0].move_to:") and fragment in str(e.value), move_to
    # a subfolder of its own root is fine: the scanner ignores it
    text = base(tmp_path, "", f'[[watch]]\npath = "{tmp_path / "a"}"\nafter_upload = "move"\n'
                              f'move_to = "{tmp_path / "a" / "done"}"\n')
    assert load_config(write(tmp_path, text)).watch[0].move_to == tmp_path / "a" / "done"


# ---------------------------------------------------------------- settings that silently did nothing

def test_move_to_without_after_upload_move_is_refused(tmp_path):
    watch = f'[[watch]]\npath = "{tmp_path / "drop"}"\nmove_to = "{tmp_path / "done"}"\n'
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, base(tmp_path, "", watch)))
    assert str(e.value).startswith("watch[0].move_to: only used with after_upload = \"move\"")
    assert 'after_upload is "keep"' in str(e.value)


@pytest.mark.parametrize("value", ['"0.5"', '"0.9B"', '"0.0001KiB"'])
def test_bandwidth_limit_below_one_byte_is_refused(tmp_path, value):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, base(tmp_path, f"[upload]\nbandwidth_limit = {value}\n")))
    assert str(e.value).startswith("upload.bandwidth_limit:") and "less than 1 byte" in str(e.value)


@pytest.mark.parametrize("value,expected", [('"0"', 0), ("0", 0), ('"0.0"', 0), ('"1.5KiB"', 1536)])
def test_bandwidth_limit_zero_or_real_sizes_load(tmp_path, value, expected):
    cfg = load_config(write(tmp_path, base(tmp_path, f"[upload]\nbandwidth_limit = {value}\n")))
    assert cfg.upload.bandwidth_limit == expected


def test_run_without_any_watch_refuses_to_start(tmp_path):
    p = write(tmp_path, base(tmp_path, "", watch=""))
    assert load_config(p).watch == ()          # `upload` and `status` still work with it
    r = subprocess.run([sys.executable, "-m", "ossyncd", "run", "-c", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "no [[watch]] section" in r.stderr and "ossyncd upload" in r.stderr


@pytest.mark.timeout(60)
def test_sighup_with_colliding_prefixes_is_rejected_and_the_running_config_kept(tmp_path, emulator, daemon_factory):
    import signal

    from tests.helpers import bucket_keys, object_bytes, random_file, wait_until
    from tests.test_operator import events
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    d = daemon_factory([{"path": str(a), "prefix": "photos/", "settle_seconds": 0.3}]).start()
    wait_until(lambda: events(d, "started"), 30, what="daemon started")
    d.config.write_text(d.config.read_text() + f'[[watch]]\npath = "{b}"\nprefix = "photos/"\n')
    d.proc.send_signal(signal.SIGHUP)
    rejected = wait_until(lambda: events(d, "reload rejected; the running config stays in force"), 10,
                          what="reload rejected log line")
    assert 'watch[1].prefix "photos/" is already used by watch[0]' in rejected[0]["error"]
    random_file(b / "IMG_0001.JPG", 300, seed=2)              # the refused watch is not armed
    data = random_file(a / "IMG_0001.JPG", 500, seed=1)
    wait_until(lambda: bucket_keys(emulator) == ["photos/IMG_0001.JPG"], 30, interval=0.2, what="upload from a/")
    assert object_bytes(emulator, "photos/IMG_0001.JPG") == data
    assert d.proc.poll() is None and not events(d, "config reloaded")
    assert d.stop() == 0


def test_temp_names_are_rules_or_file_name_globs(tmp_path):
    watch = f'[[watch]]\npath = "{tmp_path / "drop"}"\ntemp_names = ["vim-probe", "*.partial"]\n'
    assert load_config(write(tmp_path, base(tmp_path, "", watch))).watch[0].temp_names == ("vim-probe", "*.partial")
    assert load_config(write(tmp_path, base(tmp_path))).watch[0].temp_names is None     # built-in rules
    watch = f'[[watch]]\npath = "{tmp_path / "drop"}"\ntemp_names = ["tmp/*.x"]\n'
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, base(tmp_path, "", watch)))
    assert str(e.value).startswith("watch[0].temp_names") and "rsync" in str(e.value)


# ---------------------------------------------------------------- [credentials]: config owns every check

CRED_SECRET = "cfg-SECRET-7e6d5c4b3a29"


def creds_config(tmp_path, monkeypatch, prefixes=("incoming/",), **kw):
    """parse_config with an sts [credentials] section changed by ``kw`` (no watch folder needed)."""
    from ossyncd.config import parse_config
    for var in ("OSSYNCD_ACCESS_KEY_ID", "OSSYNCD_ACCESS_KEY_SECRET"):
        monkeypatch.delenv(var, raising=False)
    creds = dict(source="sts", access_key_id="LTAIuserkeyid", access_key_secret=CRED_SECRET,
                 role_arn="acs:ram::1234567890123456:role/uploader")
    creds.update(kw)
    watches = [{"path": str(tmp_path / f"w{i}"), "prefix": p} for i, p in enumerate(prefixes)]
    return parse_config({"oss": {"endpoint": "http://127.0.0.1:9000", "bucket": "drop", "region": "cn-hangzhou"},
                         "credentials": creds, "state": {"path": str(tmp_path / "state.db")}, "watch": watches},
                        watch_dirs_must_exist=False)


@pytest.mark.parametrize("kw,needle", [
    (dict(policy='{"Version":"1"}', scope_policy_to_prefixes=True),
     "credentials.policy: set either policy or scope_policy_to_prefixes, not both"),
    (dict(policy="{not json"), "credentials.policy: is not valid JSON"),
    (dict(policy=json.dumps({"Version": "1", "Statement": [{"Resource": "x" * 2100}]})),
     "-character AssumeRole limit; shorten it or use scope_policy_to_prefixes"),
    (dict(access_key_id=""), "credentials.access_key_id/access_key_secret: required with source = \"sts\"; "
                             "set them or OSSYNCD_ACCESS_KEY_ID"),
    (dict(access_key_secret=""), "OSSYNCD_ACCESS_KEY_SECRET"),
    (dict(role_arn=""), "credentials.role_arn: required with source = \"sts\""),
    (dict(sts_endpoint="ftp://sts"), "credentials.sts_endpoint: 'ftp://sts' is not an http(s) URL; write e.g. https://"),
    (dict(sts_endpoint="http://sts:port"), "credentials.sts_endpoint: 'http://sts:port' has an invalid port"),
    (dict(duration_seconds=0), "credentials.duration_seconds"),
    (dict(source="broker", broker_url=""), "credentials.broker_url: required with source = \"broker\""),
    (dict(source="broker", broker_url="broker.local/cred"),
     "credentials.broker_url: 'broker.local/cred' is not an http(s) URL; write the http(s) URL"),
    (dict(source="ecs-ram-role", ecs_metadata_url="nope"),
     "credentials.ecs_metadata_url: 'nope' is not an http(s) URL; write e.g. http://100.100.100.200/"),
    (dict(source="static", access_key_id=""), "credentials.access_key_id/access_key_secret: required with "
                                              "source = \"static\"; set them or OSSYNCD_ACCESS_KEY_ID"),
    (dict(source="static", access_key_secret=""), "OSSYNCD_ACCESS_KEY_SECRET"),
    (dict(source="kerberos"), "credentials.source: Input should be 'sts', 'broker', 'ecs-ram-role', 'env', 'static', 'default', "
                                 "'profile', 'oidc', 'process' or 'uri'"),
])
def test_credentials_errors_name_the_key_and_the_fix(tmp_path, monkeypatch, kw, needle):
    with pytest.raises(ConfigError) as ei:
        creds_config(tmp_path, monkeypatch, **kw)
    assert needle in str(ei.value)
    assert CRED_SECRET not in str(ei.value)
    assert "\n" not in str(ei.value)


def test_scoped_policy_too_long_for_these_prefixes_names_them(tmp_path, monkeypatch):
    prefixes = [f"very/long/prefix/number/{i:03d}/" for i in range(60)]
    with pytest.raises(ConfigError, match="credentials.scope_policy_to_prefixes") as ei:
        creds_config(tmp_path, monkeypatch, prefixes=prefixes, scope_policy_to_prefixes=True)
    assert "very/long/prefix/number/000/" in str(ei.value) and "2048" in str(ei.value)
    assert creds_config(tmp_path, monkeypatch, prefixes=prefixes[:3], scope_policy_to_prefixes=True)


def test_credentials_defaults_and_normal_forms(tmp_path, monkeypatch):
    c = creds_config(tmp_path, monkeypatch).credentials
    assert c.sts_endpoint == "https://sts.aliyuncs.com" and c.session_name == "ossyncd"
    assert c.ecs_metadata_url == "http://100.100.100.200/latest/meta-data/ram/security-credentials/"
    c = creds_config(tmp_path, monkeypatch, sts_endpoint="", sts_region="cn-beijing", session_name="").credentials
    assert c.sts_endpoint == "https://sts.cn-beijing.aliyuncs.com" and c.session_name == "ossyncd"
    assert creds_config(tmp_path, monkeypatch, sts_endpoint="sts.cn-shanghai.aliyuncs.com").credentials.sts_endpoint \
        == "https://sts.cn-shanghai.aliyuncs.com"
    assert creds_config(tmp_path, monkeypatch, source="ecs-ram-role", ecs_metadata_url="").credentials \
        .ecs_metadata_url == "http://100.100.100.200/latest/meta-data/ram/security-credentials/"
    assert creds_config(tmp_path, monkeypatch, policy='{ "Version": "1" }').credentials.policy == '{"Version":"1"}'
    # a key only one source reads is checked only for that source
    assert creds_config(tmp_path, monkeypatch, source="env", sts_endpoint="ftp://x", policy="{not json",
                        ecs_metadata_url="nope").credentials.source == "env"


# ---------------------------------------------------------------- ready markers, prune (#14)
@pytest.mark.parametrize("keys,fragment", [
    ('ready_suffix = ".done"\nready_file = "_SUCCESS"\n', "watch[0].ready_suffix/ready_file: set one of them"),
    ('ready_suffix = "*.done"\n', "watch[0].ready_suffix: '*.done' is not a plain file name part"),
    ('ready_file = "sub/_SUCCESS"\n', "watch[0].ready_file: 'sub/_SUCCESS' is not a plain file name part"),
    ('ready_file = ".."\n', "watch[0].ready_file: '..' is not a plain"),
    ('ready_suffix = ".done"\nexclude = ["*.done"]\n', "watch[0].ready_suffix: 'file.done' matches exclude"),
    ('ready_suffix = ".part"\n', "watch[0].ready_suffix: 'file.part' matches the temp_names rule 'partial'"),
    ('upload_markers = true\n', "watch[0].upload_markers: only used with ready_suffix"),
    ('ready_file = "_SUCCESS"\nupload_markers = true\n', "watch[0].upload_markers: only used with ready_suffix"),
    ('prune_empty_dirs = true\n', "watch[0].prune_empty_dirs: only used with after_upload = \"delete\" or \"move\""),
    ('after_upload = "delete"\nprune_min_age = 5\n', "watch[0].prune_min_age: only used with prune_empty_dirs"),
    ('after_upload = "delete"\nprune_empty_dirs = true\nprune_min_age = -1\n', "watch[0].prune_min_age"),
    ('ready_suffix = 7\n', "watch[0].ready_suffix"),
])
def test_marker_and_prune_keys_are_checked_naming_the_key(tmp_path, keys, fragment):
    drop = tmp_path / "drop"
    watch = f'[[watch]]\npath = "{drop}"\nprefix = "incoming/"\n{keys}'
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, base(tmp_path, "", watch)))
    assert fragment in str(e.value)


def test_marker_and_prune_keys_load(tmp_path):
    drop = tmp_path / "drop"
    watch = (f'[[watch]]\npath = "{drop}"\nprefix = "a/"\nready_suffix = ".done"\nupload_markers = true\n'
             f'after_upload = "delete"\nprune_empty_dirs = true\nprune_min_age = 0\n'
             f'[[watch]]\npath = "{tmp_path}/other"\nprefix = "b/"\nready_file = "_SUCCESS"\n')
    (tmp_path / "other").mkdir()
    w0, w1 = load_config(write(tmp_path, base(tmp_path, "", watch))).watch
    assert (w0.ready_suffix, w0.upload_markers, w0.prune_empty_dirs, w0.prune_min_age) == (".done", True, True, 0)
    assert (w1.ready_file, w1.ready_suffix, w1.upload_markers, w1.prune_min_age) == ("_SUCCESS", "", False, 60)


def test_hook_secret_in_a_readable_config_warns(tmp_path):
    """A [[hook]] secret signs the webhooks: like the credentials' secrets, a config that
    holds one must not be readable by group/others."""
    import os

    from ossyncd.config import secret_file_warning
    drop = tmp_path / "drop"
    drop.mkdir()
    body = textwrap.dedent(f"""
        [oss]
        endpoint = "http://127.0.0.1:9000"
        bucket = "drop"
        region = "cn-hangzhou"
        [state]
        path = "{tmp_path / 'state.db'}"
        [[watch]]
        path = "{drop}"
        [[hook]]
        on = ["uploaded"]
        url = "https://hooks.example.com/x"
        secret = "s3cr3t"
        """)
    p = write(tmp_path, body)
    os.chmod(p, 0o644)
    warning = secret_file_warning(load_config(p))
    assert warning is not None and str(p) in warning and "0644" in warning and f"chmod 600 {p}" in warning
    os.chmod(p, 0o600)
    assert secret_file_warning(load_config(p)) is None
    # the same file without the hook's secret holds nothing to protect
    p.write_text(body.replace('secret = "s3cr3t"\n', ""))
    os.chmod(p, 0o644)
    assert secret_file_warning(load_config(p)) is None
