"""What an object gets: its key and its headers, from a watch's resolved ObjectSpec (pure).

One place builds both, so the simple and the multipart paths send the same thing
(docs/architecture.md §12, docs/wire-protocol.md §8):

* `object_key_for`: the key_template rendered for one file (Unicode-normalized);
* `put_headers`: PutObject and InitiateMultipartUpload (type, cache, disposition, metadata,
  ACL, storage class, encryption, tags, x-oss-forbid-overwrite);
* `complete_headers`: CompleteMultipartUpload gets only the ACL (as oss2's own resumable
  upload sends it) and x-oss-forbid-overwrite, never the storage class;
* `callback_headers`: x-oss-callback and x-oss-callback-var, on PutObject and Complete only
  (docs/wire-protocol.md §9).
"""

from __future__ import annotations

import base64
import json
import mimetypes
import posixpath
import re
import socket
import string
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

from ossyncd.paths import object_key

if TYPE_CHECKING:
    from ossyncd.config import ObjectSpec

KEY_FIELDS = ("prefix", "relpath", "dir", "name", "stem", "ext", "host", "yyyy", "mm", "dd", "hh")
METADATA_FIELDS = ("host", "mtime", "size", "relpath")
DISPOSITION_FIELDS = ("name",)
STORAGE_CLASSES = ("Standard", "IA", "Archive", "ColdArchive", "DeepColdArchive")
SSE_VALUES = ("AES256", "KMS", "SM4")
ACLS = ("default", "private", "public-read")
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE = 10, 128, 256     # OSS object tagging limits

# (minimum billable size, minimum storage duration in days) per class; Standard has none.
CLASS_MINIMUMS = {"IA": (64 * 1024, 30), "Archive": (64 * 1024, 60), "ColdArchive": (64 * 1024, 180),
                  "DeepColdArchive": (64 * 1024, 180)}

_UTF8 = "; charset=utf-8"
# Where bare mimetypes is wrong or silent on a stock system; text types carry their charset.
BUILTIN_TYPES = {
    ".webp": "image/webp", ".woff2": "font/woff2", ".woff": "font/woff", ".m3u8": "application/vnd.apple.mpegurl",
    ".ts": "video/mp2t", ".mp4": "video/mp4", ".m4s": "video/iso.segment", ".heic": "image/heic",
    ".heif": "image/heif", ".avif": "image/avif", ".jsonl": "application/x-ndjson" + _UTF8,
    ".ndjson": "application/x-ndjson" + _UTF8, ".parquet": "application/vnd.apache.parquet",
    ".json": "application/json" + _UTF8, ".txt": "text/plain" + _UTF8, ".log": "text/plain" + _UTF8,
    ".csv": "text/csv" + _UTF8, ".md": "text/markdown" + _UTF8, ".html": "text/html" + _UTF8,
    ".htm": "text/html" + _UTF8, ".css": "text/css" + _UTF8, ".js": "text/javascript" + _UTF8,
    ".mjs": "text/javascript" + _UTF8, ".svg": "image/svg+xml", ".wasm": "application/wasm",
    ".gz": "application/gzip", ".zst": "application/zstd", ".7z": "application/x-7z-compressed",
}
DEFAULT_TYPE = "application/octet-stream"

# OSS upload callbacks (docs/wire-protocol.md §9): OSS's system variables, and ours (custom
# variables, sent in x-oss-callback-var; OSS wants custom names to be `x:` + lowercase)
MAX_CALLBACK_URLS = 5
CALLBACK_TIMEOUT = 5.0              # what OSS gives the application server, per URL
CALLBACK_READ_MARGIN = 10.0         # oss.read_timeout must cover OSS's waits plus this for the write itself
CALLBACK_SYSTEM_VARS = ("bucket", "object", "etag", "size", "mimeType", "crc64", "contentMd5", "imageInfo.height",
                        "imageInfo.width", "imageInfo.format", "vpcId", "clientIp", "reqId", "operation")
OUR_CALLBACK_VARS = ("x:ossyncd_path", "x:ossyncd_watch", "x:ossyncd_relpath", "x:ossyncd_host", "x:ossyncd_mtime")
_FORM = "application/x-www-form-urlencoded"
DEFAULT_CALLBACK_BODY = {
    _FORM: "bucket=${bucket}&object=${object}&etag=${etag}&size=${size}&mimeType=${mimeType}&crc64=${crc64}"
           "&path=${x:ossyncd_path}",
    "application/json": '{"bucket":${bucket},"object":${object},"etag":${etag},"size":${size},'
                        '"mimeType":${mimeType},"crc64":${crc64},"path":${x:ossyncd_path}}',
}
_CALLBACK_VAR = re.compile(r"\$\{([^}]*)\}")
_NUMERIC_VARS = ("size", "imageInfo.height", "imageInfo.width")   # bare numbers in a JSON body


def template_fields(template: str) -> list[str]:
    """The {field} names in a template; ValueError for a malformed one ({ without }, {0}, {a:>3})."""
    out = []
    for _, field, spec, conv in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.isidentifier() or spec or conv:
            raise ValueError(f"{{{field}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} is not a plain "
                             f"field; write fields as {{name}}, and {{{{ }}}} for literal braces")
        out.append(field)
    return out


def check_template(template: str, allowed: tuple[str, ...]) -> str:
    """The template if every field is known, else ValueError naming the unknown one."""
    for f in template_fields(template):
        if f not in allowed:
            raise ValueError(f"unknown field {{{f}}} in {template!r}; the fields are "
                             + ", ".join("{" + a + "}" for a in allowed))
    return template


def host_name() -> str:
    return socket.gethostname().split(".")[0]


@dataclass(frozen=True)
class FileFacts:
    """What the templates may say about one file."""

    relpath: str          # POSIX, relative to the watch root (the name for a file outside one)
    size: int
    mtime_ns: int
    path: str = ""        # the local path and its watch root (callback variables)
    watch: str = ""

    @property
    def mtime(self) -> datetime:
        return datetime.fromtimestamp(self.mtime_ns / 1e9, tz=timezone.utc)


def normalize(text: str, how: str) -> str:
    """NFC by default: a macOS NFD name and its NFC twin are one key."""
    return unicodedata.normalize("NFC", text) if how == "NFC" else text


def object_key_for(spec: "ObjectSpec", prefix: str, facts: FileFacts) -> str:
    """The object key of one file: the key_template, date fields from its mtime in UTC."""
    relpath = normalize(facts.relpath, spec.unicode_normalize)
    if spec.key_template == "{prefix}{relpath}":          # the default: exactly the plain join
        return object_key(prefix, relpath)
    d, name = posixpath.split(relpath)
    stem, ext = posixpath.splitext(name)
    t = facts.mtime
    fields = {"prefix": object_key(prefix, "") if prefix else "", "relpath": relpath, "dir": d + "/" if d else "",
              "name": name, "stem": stem, "ext": ext, "host": host_name(), "yyyy": f"{t.year:04d}",
              "mm": f"{t.month:02d}", "dd": f"{t.day:02d}", "hh": f"{t.hour:02d}"}
    return spec.key_template.format(**fields)


def content_type_for(spec: "ObjectSpec", name: str) -> str:
    """The configured map first, then the built-in one, then mimetypes (longest suffix wins:
    `.tar.gz` before `.gz`)."""
    lower = name.lower()
    suffixes = [lower[i:] for i, c in enumerate(lower) if c == "." and i > 0]
    for table in (spec.content_type, BUILTIN_TYPES):
        for s in suffixes:
            if s in table:
                return table[s]
    guess, _ = mimetypes.guess_type(lower, strict=False)
    return guess or DEFAULT_TYPE


def _header_value(text: str) -> str:
    """HTTP header values are Latin-1 on the wire; anything else is percent-encoded (UTF-8)."""
    return text if text.isascii() else quote(text, safe=" !#$&'()*+,/:;=?@[]^`{|}~")


def put_headers(spec: "ObjectSpec", facts: FileFacts) -> dict[str, str]:
    """Headers for PutObject and InitiateMultipartUpload."""
    name = posixpath.basename(normalize(facts.relpath, spec.unicode_normalize))
    h = {"Content-Type": content_type_for(spec, name)}
    if spec.cache_control:
        h["Cache-Control"] = spec.cache_control
    if spec.content_disposition:
        h["Content-Disposition"] = _disposition(spec.content_disposition, name)
    values = {"host": host_name(), "mtime": facts.mtime.isoformat().replace("+00:00", "Z"), "size": str(facts.size),
              "relpath": normalize(facts.relpath, spec.unicode_normalize)}
    for k, v in spec.metadata.items():
        h[f"x-oss-meta-{k}"] = _header_value(v.format(**values))
    if spec.acl != "default":
        h["x-oss-object-acl"] = spec.acl
    if spec.storage_class:
        h["x-oss-storage-class"] = spec.storage_class
    if spec.server_side_encryption:
        h["x-oss-server-side-encryption"] = spec.server_side_encryption
        if spec.kms_key_id:
            h["x-oss-server-side-encryption-key-id"] = spec.kms_key_id
    if spec.tags:
        h["x-oss-tagging"] = urlencode(spec.tags, quote_via=quote, safe="")
    if spec.overwrite != "allow":
        h["x-oss-forbid-overwrite"] = "true"
    return h


def _disposition(template: str, name: str) -> str:
    """{name} as a quoted ASCII fallback plus RFC 6266 filename* for the real (UTF-8) name."""
    if "{name}" not in template:
        return template
    if name.isascii() and '"' not in name and "\\" not in name:
        return template.format(name=name)
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    out = template.format(name=ascii_name)
    return out + f"; filename*=UTF-8''{quote(name, safe='')}" if "filename=" in template else out


def complete_headers(spec: "ObjectSpec") -> dict[str, str]:
    """CompleteMultipartUpload: the ACL and x-oss-forbid-overwrite only (never the storage class)."""
    h: dict[str, str] = {"x-oss-object-acl": spec.acl} if spec.acl != "default" else {}
    if spec.overwrite != "allow":   # another writer may have taken the key since Initiate
        h["x-oss-forbid-overwrite"] = "true"
    return h


def class_warning(spec: "ObjectSpec") -> str | None:
    """The startup warning for a class with a minimum billable size and storage duration."""
    mins = CLASS_MINIMUMS.get(spec.storage_class)
    if mins is None:
        return None
    size, days = mins
    extra = " and must be restored before it can be read" if spec.storage_class != "IA" else ""
    return (f"storage_class {spec.storage_class}: each object is billed for at least {size // 1024} KiB and "
            f"{days} days of storage (deleting or overwriting earlier still costs the rest){extra}")


def check_callback_var(name: str) -> str:
    """A custom variable name as OSS takes it: `x:` and lowercase letters, digits, '_' or '-'."""
    if not re.fullmatch(r"x:[a-z0-9_-]+", name):
        raise ValueError(f"{name!r}: custom callback variables are named x:NAME in lowercase (letters, digits, "
                         f"'_', '-'), e.g. \"x:team\"")
    return name


def callback_body(spec: "ObjectSpec") -> str:
    return spec.callback_body or DEFAULT_CALLBACK_BODY[spec.callback_body_type]


def check_callback_body(body: str, body_type: str, custom: set[str]) -> str:
    """ValueError naming a variable OSS does not know or that is not defined; a JSON body must
    be JSON once OSS has put its values in."""
    known = set(OUR_CALLBACK_VARS) | custom
    for name in _CALLBACK_VAR.findall(body):
        if name.startswith("x:"):
            check_callback_var(name)
            if name not in known:
                raise ValueError(f"${{{name}}} is not defined; ossyncd's are {', '.join(OUR_CALLBACK_VARS)}, "
                                 f"others go in callback_vars")
        elif name not in CALLBACK_SYSTEM_VARS:
            raise ValueError(f"${{{name}}} is not an OSS variable; they are "
                             + ", ".join("${" + v + "}" for v in CALLBACK_SYSTEM_VARS)
                             + ", and custom ones are ${x:name}")
    if body_type != _FORM:
        sample = _CALLBACK_VAR.sub(lambda m: "1" if m.group(1) in _NUMERIC_VARS else '"v"', body)
        try:
            json.loads(sample)
        except ValueError as e:
            raise ValueError(f"{body!r} is not JSON once OSS substitutes its variables ({e}); OSS puts each "
                             f"variable in as a JSON value, so write ${{object}}, not \"${{object}}\"") from None
    return body


def _b64json(obj) -> str:
    return base64.b64encode(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()).decode()


def callback_headers(spec: "ObjectSpec", facts: FileFacts) -> dict[str, str]:
    """x-oss-callback (and x-oss-callback-var for the custom variables the body uses), for
    PutObject and CompleteMultipartUpload only; {} without callback_url."""
    if not spec.callback_url:
        return {}
    body = callback_body(spec)
    cb = {"callbackUrl": ";".join(spec.callback_url), "callbackBody": body,
          "callbackBodyType": spec.callback_body_type}
    if spec.callback_host:
        cb["callbackHost"] = spec.callback_host
    relpath = normalize(facts.relpath, spec.unicode_normalize)
    ours = {"x:ossyncd_path": facts.path, "x:ossyncd_watch": facts.watch, "x:ossyncd_relpath": relpath,
            "x:ossyncd_host": host_name(), "x:ossyncd_mtime": facts.mtime.isoformat().replace("+00:00", "Z")}
    values = {"host": host_name(), "mtime": ours["x:ossyncd_mtime"], "size": str(facts.size), "relpath": relpath}
    ours.update({k: v.format(**values) for k, v in spec.callback_vars.items()})
    used = {n: ours[n] for n in dict.fromkeys(_CALLBACK_VAR.findall(body)) if n in ours}
    h = {"x-oss-callback": _b64json(cb)}
    if used:
        h["x-oss-callback-var"] = _b64json(used)
    return h
