"""What the object gets (README "What the object gets"): headers, metadata, tags, storage class,
encryption, ACL and the key, configured in [upload] and per [[watch]], sent by the daemon through
the real oss2 to the emulator and read back with the root key; config errors; the policy."""

from __future__ import annotations

import json
import os
import signal
import unicodedata
from datetime import datetime, timezone
from pathlib import Path

import oss2
import pytest

from ossyncd import objectspec
from ossyncd.config import ObjectSpec, parse_config
from ossyncd.errors import ConfigError
from ossyncd.objectspec import FileFacts
from ossyncd.policy import upload_policy
from tests.helpers import (
    MiB,
    events,
    fast_upload,
    object_bytes,
    ossyncd,
    random_file,
    root_bucket,
    sts_credentials,
    wait_until,
    write_config,
)

SETTLE = {"settle_seconds": 0.3}
WHEN = int(datetime(2024, 3, 5, 7, 8, 9, tzinfo=timezone.utc).timestamp())   # a file's mtime, UTC
HOST = objectspec.host_name()


def dropped(folder: Path, rel: str, size: int, seed: int, staging: Path) -> bytes:
    """A file with mtime WHEN, renamed into the watch (a settled arrival)."""
    tmp = staging / f"{seed}.tmp"
    data = random_file(tmp, size, seed)
    os.utime(tmp, (WHEN, WHEN))
    dest = folder / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, dest)
    return data


@pytest.fixture
def folders(tmp_path):
    out = {n: tmp_path / n for n in ("a", "b", "staging")}
    for p in out.values():
        p.mkdir()
    return out


# ---------------------------------------------------------------- pure rules
LISTED = {".webp": "image/webp", ".woff2": "font/woff2", ".m3u8": "application/vnd.apple.mpegurl",
          ".ts": "video/mp2t", ".mp4": "video/mp4", ".heic": "image/heic",
          ".jsonl": "application/x-ndjson; charset=utf-8", ".parquet": "application/vnd.apache.parquet"}


@pytest.mark.parametrize("ext", sorted(LISTED))
def test_content_type_of_listed_extensions(ext):
    assert objectspec.content_type_for(ObjectSpec(), "clip" + ext.upper()) == LISTED[ext]
    custom = ObjectSpec(content_type={ext: "application/x-custom; charset=utf-8"})
    assert objectspec.content_type_for(custom, "clip" + ext) == "application/x-custom; charset=utf-8"


def test_content_type_fallbacks():
    spec = ObjectSpec()
    assert objectspec.content_type_for(spec, "a.png") == "image/png"          # mimetypes
    assert objectspec.content_type_for(spec, "a.tar.gz") == "application/gzip"
    assert objectspec.content_type_for(spec, "noext") == "application/octet-stream"
    assert objectspec.content_type_for(spec, "a.log") == "text/plain; charset=utf-8"


def test_key_template_fields_and_nfc():
    spec = ObjectSpec(key_template="{prefix}{host}/{yyyy}/{mm}/{dd}/{hh}/{dir}{stem}{ext}")
    facts = FileFacts("cam/clip.final.mp4", 10, WHEN * 10**9)
    assert objectspec.object_key_for(spec, "fleet", facts) == f"fleet/{HOST}/2024/03/05/07/cam/clip.final.mp4"
    nfd = unicodedata.normalize("NFD", "café/été.txt")
    assert nfd != unicodedata.normalize("NFC", nfd)
    assert objectspec.object_key_for(ObjectSpec(), "in/", FileFacts(nfd, 1, 0)) == "in/" + unicodedata.normalize(
        "NFC", nfd)
    assert objectspec.object_key_for(ObjectSpec(unicode_normalize="none"), "", FileFacts(nfd, 1, 0)) == nfd


def test_complete_never_carries_the_storage_class():
    spec = ObjectSpec(storage_class="IA", acl="private", tags={"a": "b"}, server_side_encryption="AES256")
    assert objectspec.complete_headers(spec) == {"x-oss-object-acl": "private"}
    h = objectspec.put_headers(spec, FileFacts("x.bin", 1, 0))
    assert h["x-oss-storage-class"] == "IA" and h["x-oss-tagging"] == "a=b"


def test_non_ascii_values_are_encoded_for_the_wire():
    spec = ObjectSpec(metadata={"path": "{relpath}"}, content_disposition='attachment; filename="{name}"')
    h = objectspec.put_headers(spec, FileFacts("été/ça.txt", 1, 0))
    assert h["x-oss-meta-path"] == "%C3%A9t%C3%A9/%C3%A7a.txt"
    assert h["Content-Disposition"] == "attachment; filename=\"?a.txt\"; filename*=UTF-8''%C3%A7a.txt"
    assert all(v.isascii() for v in h.values())


def test_check_config_refuses_a_bad_object_key(emulator, tmp_path):
    cfg = write_config(tmp_path / "bad.toml", emulator, state=tmp_path / "s.db",
                       upload={"storage_class": "Glacier"}, watches=[{"path": str(tmp_path)}])
    r = ossyncd("check-config", "-c", cfg)
    assert r.returncode == 2, r
    assert "upload.storage_class: 'Glacier' is not an OSS storage class; write one of" in r.stderr


def _cfg(tmp_path, upload=None, watch=None):
    return parse_config({"oss": {"endpoint": "http://127.0.0.1:9", "bucket": "drop", "signature": "v1"},
                         "state": {"path": str(tmp_path / "s.db")}, "upload": upload or {},
                         "watch": [{"path": str(tmp_path), **(watch or {})}]})


@pytest.mark.parametrize("where, values, expected", [
    ("watch", {"storage_class": "Glacier"},
     'watch[0].storage_class: \'Glacier\' is not an OSS storage class; write one of "Standard", "IA"'),
    ("upload", {"tags": {f"k{i}": "v" for i in range(11)}},
     "upload.tags: 11 tags; OSS allows at most 10 per object - remove some"),
    ("watch", {"tags": {"k" * 129: "v"}}, "watch[0].tags: tag key"),
    ("watch", {"tags": {"k": "v" * 257}}, "watch[0].tags: tag 'k' has a value of 257 characters"),
    ("upload", {"key_template": "{prefix}{relpath}.{year}"},
     "upload.key_template: unknown field {year} in '{prefix}{relpath}.{year}'; the fields are {prefix}, "),
    ("watch", {"key_template": "{prefix}{host}"}, "watch[0].key_template: '{prefix}{host}' names no part of the file"),
    ("watch", {"metadata": {"who": "{user}"}}, "watch[0].metadata: unknown field {user}"),
    ("watch", {"server_side_encryption": "AES128"}, "watch[0].server_side_encryption: 'AES128' is not"),
    ("watch", {"kms_key_id": "k1"}, 'watch[0].kms_key_id: only used with server_side_encryption = "KMS"'),
    ("watch", {"acl": "public"}, "watch[0].acl: Input should be 'default', 'private' or 'public-read'"),
])
def test_config_errors_name_the_key_and_the_fix(tmp_path, where, values, expected):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, **{where: values})
    assert str(e.value).startswith(expected), str(e.value)


def test_watch_overrides_and_tables_layer_over_upload(tmp_path):
    cfg = _cfg(tmp_path, upload={"storage_class": "IA", "tags": {"a": "1", "b": "2"}, "cache_control": "no-cache"},
               watch={"storage_class": "Standard", "tags": {"b": "3"}})
    spec = cfg.watch[0].object
    assert (spec.storage_class, spec.tags, spec.cache_control) == ("Standard", {"a": "1", "b": "3"}, "no-cache")
    assert cfg.object.storage_class == "IA"


# ---------------------------------------------------------------- the emulator validates like OSS
def test_emulator_refuses_bad_properties_and_unpermitted_kms(emulator, root_bucket, sts_credentials):
    def code(bucket, headers, key="x.bin"):
        with pytest.raises(oss2.exceptions.OssError) as e:
            bucket.put_object(key, b"x", headers=headers)
        return e.value.status, e.value.code

    assert code(root_bucket, {"x-oss-storage-class": "Glacier"}) == (400, "InvalidArgument")
    assert code(root_bucket, {"x-oss-tagging": "&".join(f"k{i}=v" for i in range(11))}) == (400, "InvalidTag")
    assert code(root_bucket, {"x-oss-tagging": "k=" + "v" * 257}) == (400, "InvalidTag")
    assert code(root_bucket, {"x-oss-server-side-encryption": "AES128"}) == (400, "InvalidEncryptionAlgorithmError")
    root_bucket.put_object("x.bin", b"first")
    assert code(root_bucket, {"x-oss-forbid-overwrite": "true"}) == (409, "FileAlreadyExists")

    def session(**features):
        c = sts_credentials(policy=upload_policy("drop", [""], **features), role_arn=emulator.full_role_arn)
        auth = oss2.StsAuth(c["AccessKeyId"], c["AccessKeySecret"], c["SecurityToken"])
        return oss2.Bucket(auth, emulator.oss_url, "drop")

    kms = {"x-oss-server-side-encryption": "KMS", "x-oss-server-side-encryption-key-id": "key-1"}
    plain = session()
    assert code(plain, kms) == (403, "AccessDenied")
    assert code(plain, {"x-oss-tagging": "a=b"}) == (403, "AccessDenied")
    with pytest.raises(oss2.exceptions.OssError) as e:
        plain.init_multipart_upload("m.bin", headers=kms)
    assert e.value.code == "AccessDenied"
    session(kms=True, tagging=True).put_object("k.bin", b"kms", headers={**kms, "x-oss-tagging": "a=b"})
    h = root_bucket.head_object("k.bin").headers
    assert (h["x-oss-server-side-encryption"], h["x-oss-server-side-encryption-key-id"],
            h["x-oss-tagging-count"]) == ("KMS", "key-1", "1")


# ---------------------------------------------------------------- the daemon, end to end
def _props_watches(folders):
    return [{"path": str(folders["a"]), "prefix": "a/", **SETTLE, "storage_class": "IA", "acl": "private",
             "server_side_encryption": "KMS", "kms_key_id": "key-1", "tags": {"tier": "a+b=c/d é"},
             "metadata": {"size": "{size}", "mtime": "{mtime}", "path": "{relpath}"},
             "content_disposition": 'attachment; filename="{name}"'},
            {"path": str(folders["b"]), "prefix": "b/", **SETTLE}]


PROPS_UPLOAD = {"storage_class": "Standard", "server_side_encryption": "AES256", "cache_control": "max-age=60",
                "tags": {"project": "cams"}, "metadata": {"origin": "{host}"},
                "content_type": {".log": "text/x-log; charset=utf-8"}}


def test_daemon_sets_every_property_on_simple_and_multipart_objects(emulator, daemon_factory, folders):
    # the role that may tag and use KMS, narrowed (scope_policy_to_prefixes) to exactly the policy ossyncd
    # computes for this config: the grown policy is enough
    d = daemon_factory(_props_watches(folders), upload=fast_upload(**PROPS_UPLOAD),
                       credentials=sts_credentials(emulator, scope_policy_to_prefixes=True,
                                                   role_arn=emulator.full_role_arn))
    d.start()
    sent = {"a/cam/small.log": dropped(folders["a"], "cam/small.log", 1000, 1, folders["staging"]),
            "a/cam/big.mp4": dropped(folders["a"], "cam/big.mp4", 3 * MiB // 2, 2, folders["staging"]),
            "b/plain.log": dropped(folders["b"], "plain.log", 2000, 3, folders["staging"]),
            "b/big.parquet": dropped(folders["b"], "big.parquet", 3 * MiB // 2, 4, folders["staging"])}
    for n, ext in enumerate(LISTED):
        sent[f"b/t{ext}"] = dropped(folders["b"], f"t{ext}", 10, 10 + n, folders["staging"])
    d.wait_states({"done": len(sent)}, 60)
    modes = {f["key"]: f["mode"] for f in d.files()}
    assert modes["a/cam/big.mp4"] == modes["b/big.parquet"] == "multipart"
    assert modes["a/cam/small.log"] == modes["b/plain.log"] == "simple"
    bucket = root_bucket(emulator)
    for key, data in sent.items():
        assert object_bytes(emulator, key) == data, key
    mtime = datetime.fromtimestamp(WHEN, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    for key in ("a/cam/small.log", "a/cam/big.mp4"):
        h = bucket.head_object(key).headers
        name = key.rsplit("/", 1)[1]
        assert h["Content-Type"] == ("text/x-log; charset=utf-8" if key.endswith(".log") else "video/mp4")
        assert h["Cache-Control"] == "max-age=60"
        assert h["Content-Disposition"] == f'attachment; filename="{name}"'
        assert (h["x-oss-meta-origin"], h["x-oss-meta-size"], h["x-oss-meta-mtime"], h["x-oss-meta-path"]) == (
            HOST, str(len(sent[key])), mtime, key.removeprefix("a/"))
        assert (h["x-oss-storage-class"], h["x-oss-server-side-encryption"],
                h["x-oss-server-side-encryption-key-id"]) == ("IA", "KMS", "key-1")
        assert bucket.get_object_tagging(key).tag_set.tagging_rule == {"project": "cams", "tier": "a+b=c/d é"}
        assert bucket.get_object_acl(key).acl == "private"
    for key in ("b/plain.log", "b/big.parquet"):
        h = bucket.head_object(key).headers
        assert h["Content-Type"] == ("text/x-log; charset=utf-8" if key.endswith(".log")
                                     else "application/vnd.apache.parquet")
        assert (h["x-oss-storage-class"], h["x-oss-server-side-encryption"], h["x-oss-meta-origin"]) == (
            "Standard", "AES256", HOST)
        assert "x-oss-server-side-encryption-key-id" not in h and "Content-Disposition" not in h
        assert "x-oss-meta-size" not in h
        assert bucket.get_object_tagging(key).tag_set.tagging_rule == {"project": "cams"}
        assert bucket.get_object_acl(key).acl == "default"
    for ext, typ in LISTED.items():
        assert bucket.head_object(f"b/t{ext}").headers["Content-Type"] == typ
    warned = events(d, "storage class minimums")
    assert len(warned) == 1 and "IA" in warned[0]["problem"] and "30 days" in warned[0]["problem"], warned


def test_daemon_key_template_and_nfd_nfc_twins(emulator, daemon_factory, folders):
    d = daemon_factory([{"path": str(folders["a"]), "prefix": "fleet/", **SETTLE,
                         "key_template": "{prefix}{host}/{yyyy}/{mm}/{dd}/{relpath}"}])
    d.start()
    data = dropped(folders["a"], "logs/app.log", 100, 1, folders["staging"])
    nfc = unicodedata.normalize("NFC", "café.txt")
    nfd = unicodedata.normalize("NFD", nfc)
    twin_a = dropped(folders["a"], nfd, 50, 2, folders["staging"])
    d.wait_states({"done": 2}, 30)
    twin_b = dropped(folders["a"], nfc, 60, 3, folders["staging"])
    d.wait_states({"done": 3}, 30)
    base = f"fleet/{HOST}/2024/03/05/"
    rows = {f["path"]: f["key"] for f in d.files()}
    assert rows[str(folders["a"] / nfd)] == rows[str(folders["a"] / nfc)] == base + nfc
    keys = sorted(o.key for o in oss2.ObjectIterator(root_bucket(emulator)))
    assert keys == sorted([base + "logs/app.log", base + nfc])     # the twins are one object
    assert object_bytes(emulator, base + "logs/app.log") == data
    assert object_bytes(emulator, base + nfc) == twin_b != twin_a   # overwrite = allow: the later one


def test_sighup_with_a_bad_object_config_is_rejected(emulator, daemon_factory, folders):
    watch = {"path": str(folders["a"]), "prefix": "", **SETTLE, "storage_class": "IA"}
    d = daemon_factory([watch])
    d.start()
    wait_until(lambda: events(d, "started"), 20, what="daemon up")
    bad = [({"storage_class": "Glacier"}, "watch[0].storage_class: 'Glacier' is not an OSS storage class"),
           ({"tags": {f"k{i}": "v" for i in range(11)}}, "watch[0].tags: 11 tags; OSS allows at most 10"),
           ({"key_template": "{prefix}{nope}{relpath}"}, "watch[0].key_template: unknown field {nope}")]
    for n, (change, message) in enumerate(bad, 1):
        write_config(d.config, emulator, state=d.db, watches=[{**watch, **change}], upload=fast_upload(),
                     daemon={"rescan_interval": 5.0})
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(events(d, "reload rejected; the running config stays in force")) == n, 15,
                   what=f"reload {n} rejected")
        assert message in events(d, "reload rejected; the running config stays in force")[-1]["error"]
    # the daemon keeps the IA config in force; `status` (which reads the file) needs a valid one again
    write_config(d.config, emulator, state=d.db, watches=[{**watch, "storage_class": "Standard"}],
                 upload=fast_upload(), daemon={"rescan_interval": 5.0})
    data = dropped(folders["a"], "after.bin", 100, 9, folders["staging"])
    d.wait_states({"done": 1}, 30)
    assert object_bytes(emulator, "after.bin") == data
    assert root_bucket(emulator).head_object("after.bin").headers["x-oss-storage-class"] == "IA"


def test_policy_grows_with_tags_and_kms_only(emulator, tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    docs = {}
    for name, extra in (("plain", {}), ("tags", {"tags": {"a": "b"}}),
                        ("kms", {"server_side_encryption": "KMS"}), ("forbid", {"overwrite": "forbid"})):
        cfg = write_config(tmp_path / f"{name}.toml", emulator, state=tmp_path / "s.db",
                           watches=[{"path": str(drop), "prefix": "in/", **extra}])
        r = ossyncd("policy", "-c", cfg)
        assert r.returncode == 0, r.stderr
        docs[name] = json.loads(r.stdout)

    def actions(doc):
        return sorted(a for st in doc["Statement"] for a in st["Action"])

    base = sorted(upload_policy("drop", ["in/"])["Statement"][0]["Action"] + ["oss:ListMultipartUploads"])
    assert actions(docs["plain"]) == base and len(base) == 8
    assert actions(docs["tags"]) == sorted(base + ["oss:PutObjectTagging"])
    assert actions(docs["kms"]) == sorted(base + ["kms:Decrypt", "kms:GenerateDataKey"])
    assert actions(docs["forbid"]) == sorted(base + ["oss:GetObject"])     # HEAD to recognise our own object
    kms_st = [st for st in docs["kms"]["Statement"] if st["Action"][0].startswith("kms:")]
    assert kms_st == [{"Effect": "Allow", "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
                       "Resource": ["acs:kms:*:*:*"]}]


# ---------------------------------------------------------------- overwrite
def test_rename_candidates():
    from ossyncd.uploader import _candidates

    def first(key, n=3, resume=None):
        out = _candidates(key, "rename", resume)
        return [next(out) for _ in range(n)]
    assert first("in/x.bin") == ["in/x.bin", "in/x-1.bin", "in/x-2.bin"]
    assert first("a.tar.gz", 2) == ["a.tar.gz", "a-1.tar.gz"]
    assert first(".env", 2) == [".env", ".env-1"]
    assert first("in/x.bin", 3, resume="in/x-1.bin") == ["in/x-1.bin", "in/x-2.bin", "in/x-3.bin"]
    assert list(_candidates("in/x.bin", "forbid", "in/x-1.bin")) == ["in/x.bin"]


def _full_role(emulator):
    """The role that may read back, narrowed to exactly the policy ossyncd computes for the config."""
    return sts_credentials(emulator, scope_policy_to_prefixes=True, role_arn=emulator.full_role_arn)


def test_overwrite_allow_forbid_skip_rename(emulator, daemon_factory, tmp_path):
    roots = {m: tmp_path / m for m in ("allow", "forbid", "skip", "rename")}
    for p in roots.values():
        p.mkdir()
    staging = tmp_path / "staging"
    staging.mkdir()
    bucket = root_bucket(emulator)
    theirs = {f"{m}/x.bin": f"someone else's {m}".encode() for m in ("allow", "forbid", "skip", "rename")}
    theirs["rename/x-1.bin"] = b"someone else's x-1"
    for key, data in theirs.items():
        bucket.put_object(key, data)
    d = daemon_factory([{"path": str(p), "prefix": f"{m}/", **SETTLE, "overwrite": m} for m, p in roots.items()],
                       credentials=_full_role(emulator), daemon={"rescan_interval": 1.0})
    d.start()
    sent = {m: dropped(roots[m], "x.bin", 3 * MiB // 2 if m == "rename" else 1000, n, staging)
            for n, m in enumerate(roots)}
    d.wait_states({"done": 2, "failed": 1, "exists": 1}, 30)
    rows = {f["path"]: f for f in d.files()}
    forbid, skip, rename = (rows[str(roots[m] / "x.bin")] for m in ("forbid", "skip", "rename"))
    assert forbid["state"] == "failed" and "an object already exists at forbid/x.bin" in forbid["error"], forbid
    assert skip["state"] == "exists" and "an object already exists at skip/x.bin" in skip["error"], skip
    assert skip["next_attempt_at"] is None
    assert (rename["state"], rename["key"], rename["renamed_from"], rename["mode"]) == (
        "done", "rename/x-2.bin", "rename/x.bin", "multipart")
    assert object_bytes(emulator, "rename/x-2.bin") == sent["rename"]
    assert object_bytes(emulator, "allow/x.bin") == sent["allow"]
    for key in ("forbid/x.bin", "skip/x.bin", "rename/x.bin", "rename/x-1.bin"):
        assert object_bytes(emulator, key) == theirs[key], key          # never replaced
    # `skip` is not retried: later rescans leave it alone; under allow a rewrite replaces the object
    rescans = len(events(d, "rescan"))
    wait_until(lambda: {e["root"] for e in events(d, "rescan")[rescans:]} >= {str(p) for p in roots.values()}, 20,
               what="a later rescan of every root")
    assert [f for f in d.files() if f["path"] == skip["path"]][0]["state"] == "exists"
    new = dropped(roots["allow"], "x.bin", 2000, 99, staging)
    wait_until(lambda: object_bytes(emulator, "allow/x.bin") == new, 30, what="allow/x.bin replaced")
    assert "exists 1" in ossyncd("status", "-c", d.config).stdout


def test_kill_9_after_our_own_write_is_no_conflict_under_forbid(emulator, daemon_factory, folders):
    d = daemon_factory([{"path": str(folders["a"]), "prefix": "", **SETTLE, "overwrite": "forbid"}],
                       credentials=_full_role(emulator))
    # OSS writes the object, then the answer is held back: a kill now loses only the state commit
    emulator.set_faults([{"op": "CompleteMultipartUpload", "delay_ms": 60000, "count": 1},
                         {"op": "PutObject", "delay_ms": 60000, "count": 1}])
    d.start()
    big = dropped(folders["a"], "big.bin", 3 * MiB // 2, 1, folders["staging"])
    small = dropped(folders["a"], "small.bin", 1000, 2, folders["staging"])
    wait_until(lambda: emulator.stats()["objects"] == 2, 30, what="both objects written")
    d.proc.kill()
    d.proc.wait()
    emulator.set_faults([])
    received = emulator.stats()["bytes_received"]
    d.start()
    d.wait_states({"done": 2}, 30)
    rows = {f["key"]: f for f in d.files()}
    assert rows["big.bin"]["mode"] == rows["small.bin"]["mode"] == "recognised", rows
    assert object_bytes(emulator, "big.bin") == big and object_bytes(emulator, "small.bin") == small
    # no part is sent again; a refused PutObject still carries its body (the 409 comes after it)
    assert emulator.stats()["bytes_received"] - received <= len(small)
    assert emulator.stats()["uploads_open"] == 0
    assert events(d, "upload failed") == []
