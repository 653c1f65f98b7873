"""Objects and multipart uploads, kept on disk under the data directory.

Layout (all JSON sidecars are rewritten atomically with os.replace):

    DATA/tmp/                         bodies being received
    DATA/buckets/B/objects/H.json     object metadata (H = sha1 of the key)
    DATA/buckets/B/objects/H.V.N.data object bytes, one segment per part (a fresh V per version;
                                      a multipart object keeps its part files, Complete copies nothing)
    DATA/buckets/B/uploads/U/upload.json, N.part, N.json

An in-memory index (sorted key list per bucket, uploads by id) is rebuilt from the
sidecars at start, so an emulator restarted on the same DATA keeps its state.
Bodies are streamed to DATA/tmp by the caller (see ops.receive_body) and only
renamed into place here, under one lock, so index and disk never disagree.
"""

import bisect
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

import anycrc

from .errors import OSSError

CRC64 = anycrc.Model("CRC64-XZ")
MIN_PART_SIZE = 100 * 1024
MAX_PART_NUMBER = 10000
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


@dataclass
class ObjectMeta:
    key: str
    size: int
    etag: str            # uppercase, no quotes
    crc64: int
    content_type: str
    mtime: float
    type: str = "Normal"  # or Multipart
    headers: dict = field(default_factory=dict)  # x-oss-meta-*, Cache-Control, ...
    segments: list = field(default_factory=list)  # [[file name, size], ...] in order


@dataclass
class Part:
    number: int
    size: int
    etag: str
    crc64: int
    mtime: float


@dataclass
class Upload:
    bucket: str
    key: str
    upload_id: str
    initiated: float
    content_type: str
    headers: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict)  # number -> Part


class _Bucket:
    def __init__(self, name, root, created):
        self.name = name
        self.root = root
        self.created = created
        self.objects = {}   # key -> ObjectMeta
        self.keys = []      # sorted keys


def _key_hash(key):
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def _write_json(path, obj):
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def multipart_etag(part_etags):
    md5 = hashlib.md5(b"".join(bytes.fromhex(e) for e in part_etags))
    return f"{md5.hexdigest().upper()}-{len(part_etags)}"


class ObjectReader:
    """The segment files of one object version, opened together (a consistent snapshot)."""

    def __init__(self, paths_sizes):
        self.files = []
        try:
            for path, size in paths_sizes:
                self.files.append((open(path, "rb"), size))
        except BaseException:
            self.close()
            raise

    def _spans(self, offset, count):
        for f, size in self.files:
            if count <= 0:
                return
            if offset >= size:
                offset -= size
                continue
            n = min(size - offset, count)
            yield f, offset, n
            offset, count = 0, count - n

    def sendfile(self, sock, offset, count):
        for f, off, n in self._spans(offset, count):
            sock.sendfile(f, off, n)

    def chunks(self, offset, count, chunk=1 << 20):
        for f, off, n in self._spans(offset, count):
            f.seek(off)
            while n > 0:
                data = f.read(min(chunk, n))
                if not data:
                    raise IOError("object segment is shorter than recorded")
                n -= len(data)
                yield data

    def close(self):
        for f, _ in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()



def _page(entries, prefix, delimiter, after, limit, kind):
    """One listing page from (key, item) pairs in key order, already past the marker: keys
    with `delimiter` after the prefix fold into common prefixes; at most `limit` entries."""
    out, last_cp = [], None
    for key, item in entries:
        if delimiter:
            j = key.find(delimiter, len(prefix))
            if j >= 0:
                cp = key[:j + len(delimiter)]
                if cp == last_cp or cp <= after:
                    continue
                if len(out) >= limit:
                    return out, True
                out.append(("cp", cp))
                last_cp = cp
                continue
        if len(out) >= limit:
            return out, True
        out.append((kind, item))
    return out, False

class Storage:
    def __init__(self, data_dir, buckets=()):
        self.root = os.path.abspath(data_dir)
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.lock = threading.RLock()
        self.buckets = {}
        self.uploads = {}   # upload_id -> Upload
        self._seq = 0
        os.makedirs(self.tmp_dir, exist_ok=True)
        os.makedirs(os.path.join(self.root, "buckets"), exist_ok=True)
        for name in buckets:
            if not BUCKET_RE.match(name):
                raise ValueError(f"invalid bucket name {name!r}: 3-63 characters of [a-z0-9-], "
                                 "not starting or ending with '-'")
            os.makedirs(os.path.join(self.root, "buckets", name, "objects"), exist_ok=True)
            os.makedirs(os.path.join(self.root, "buckets", name, "uploads"), exist_ok=True)
        self._load()

    # ---------- loading ----------
    def _load(self):
        for f in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, f)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _unlink(path)
        broot = os.path.join(self.root, "buckets")
        for name in sorted(os.listdir(broot)):
            path = os.path.join(broot, name)
            b = _Bucket(name, path, os.stat(path).st_mtime)
            self.buckets[name] = b
            odir = os.path.join(path, "objects")
            os.makedirs(odir, exist_ok=True)
            for fn in os.listdir(odir):
                if fn.endswith(".json"):
                    with open(os.path.join(odir, fn), encoding="utf-8") as f:
                        meta = ObjectMeta(**json.load(f))
                    b.objects[meta.key] = meta
            b.keys = sorted(b.objects)
            udir = os.path.join(path, "uploads")
            os.makedirs(udir, exist_ok=True)
            for uid in os.listdir(udir):
                try:
                    with open(os.path.join(udir, uid, "upload.json"), encoding="utf-8") as f:
                        up = Upload(**json.load(f))
                except (OSError, ValueError):
                    shutil.rmtree(os.path.join(udir, uid), ignore_errors=True)
                    continue
                up.parts = {}
                for fn in os.listdir(os.path.join(udir, uid)):
                    if fn.endswith(".json") and fn != "upload.json":
                        with open(os.path.join(udir, uid, fn), encoding="utf-8") as f:
                            p = Part(**json.load(f))
                        up.parts[p.number] = p
                self.uploads[uid] = up

    # ---------- helpers ----------
    def tmp_path(self):
        return os.path.join(self.tmp_dir, uuid.uuid4().hex)

    def bucket(self, name):
        b = self.buckets.get(name)
        if b is None:
            raise OSSError(404, "NoSuchBucket", "The specified bucket does not exist.",
                           ec="0015-00000101", extra={"BucketName": name})
        return b

    def _obj_dir(self, b):
        return os.path.join(b.root, "objects")

    def _upload_dir(self, up):
        return os.path.join(self.buckets[up.bucket].root, "uploads", up.upload_id)

    def _get_upload(self, bucket, key, upload_id):
        up = self.uploads.get(upload_id)
        if up is None or up.bucket != bucket or up.key != key:
            raise OSSError(404, "NoSuchUpload",
                           "The specified upload does not exist. The upload ID may be invalid, "
                           "or the upload may have been aborted or completed.",
                           ec="0042-00000002", extra={"UploadId": upload_id})
        return up

    def exists_error(self):
        return OSSError(409, "FileAlreadyExists", "The object you specified already exists and can not be overwritten.",
                        ec="0042-00000214")

    # ---------- objects ----------
    def head(self, bucket, key):
        with self.lock:
            b = self.bucket(bucket)
            meta = b.objects.get(key)
        if meta is None:
            raise OSSError(404, "NoSuchKey", "The specified key does not exist.",
                           ec="0026-00000001", extra={"Key": key})
        return meta

    def open(self, bucket, key):
        """(meta, ObjectReader) of the current version, consistent with each other."""
        with self.lock:
            meta = self.head(bucket, key)
            odir = self._obj_dir(self.buckets[bucket])
            return meta, ObjectReader([(os.path.join(odir, name), size) for name, size in meta.segments])

    def exists(self, bucket, key):
        with self.lock:
            return key in self.bucket(bucket).objects

    def commit_object(self, bucket, meta, sources, forbid_overwrite=False):
        """Rename the received file(s) into place as the new version of `meta.key`.

        sources: [(path, size)] in order: one temp file for PutObject, the parts for Complete.
        """
        with self.lock:
            b = self.bucket(bucket)
            if forbid_overwrite and meta.key in b.objects:
                raise self.exists_error()
            h = _key_hash(meta.key)
            version = uuid.uuid4().hex
            odir = self._obj_dir(b)
            meta.segments = []
            for i, (src, size) in enumerate(sources):
                name = f"{h}.{version}.{i}.data"
                os.replace(src, os.path.join(odir, name))
                meta.segments.append([name, size])
            _write_json(os.path.join(odir, h + ".json"), asdict(meta))
            old = b.objects.get(meta.key)
            b.objects[meta.key] = meta
            if old is None:
                bisect.insort(b.keys, meta.key)
        if old is not None:
            self._discard(odir, old)
        return meta

    @staticmethod
    def _discard(odir, meta):
        """Unlink an old version's files, off the request path when big (freeing takes a while)."""
        paths = [os.path.join(odir, name) for name, _ in meta.segments]
        if meta.size < (8 << 20):
            return [_unlink(p) for p in paths]
        threading.Thread(target=lambda: [_unlink(p) for p in paths], daemon=True).start()

    def _discard_upload_dir(self, up):
        """Move the upload's directory out of the index's way at once, delete it in the background."""
        trash = self.tmp_path()
        try:
            os.rename(self._upload_dir(up), trash)
        except FileNotFoundError:
            return
        threading.Thread(target=shutil.rmtree, args=(trash, True), daemon=True).start()

    def delete(self, bucket, key):
        with self.lock:
            b = self.bucket(bucket)
            meta = b.objects.pop(key, None)
            if meta is None:
                return False
            del b.keys[bisect.bisect_left(b.keys, key)]
            odir = self._obj_dir(b)
            _unlink(os.path.join(odir, _key_hash(key) + ".json"))
        self._discard(odir, meta)
        return True

    def list_objects(self, bucket, prefix, after, delimiter, limit):
        """Entries after `after` (exclusive): ([('obj', meta) | ('cp', prefix)], truncated)."""
        with self.lock:
            b = self.bucket(bucket)
            keys, objects = b.keys, b.objects
            start = bisect.bisect_right(keys, after) if after >= prefix else bisect.bisect_left(keys, prefix)

            def entries():
                for k in keys[start:]:
                    if not k.startswith(prefix):
                        if k > prefix:
                            return
                        continue
                    yield k, objects[k]
            return _page(entries(), prefix, delimiter, after, limit, "obj")

    # ---------- multipart ----------
    def initiate(self, bucket, key, content_type, headers, forbid_overwrite=False):
        with self.lock:
            b = self.bucket(bucket)
            if forbid_overwrite and key in b.objects:
                raise self.exists_error()
            self._seq += 1
            uid = "%012X%04X%s" % (time.time_ns() // 1000 % (1 << 48), self._seq % 65536,
                                   os.urandom(8).hex().upper())
            up = Upload(bucket, key, uid, time.time(), content_type, dict(headers))
            os.makedirs(self._upload_dir(up))
            _write_json(os.path.join(self._upload_dir(up), "upload.json"),
                        {k: v for k, v in asdict(up).items() if k != "parts"})
            self.uploads[uid] = up
            return up

    def check_upload(self, bucket, key, upload_id):
        with self.lock:
            self.bucket(bucket)
            return self._get_upload(bucket, key, upload_id)

    def commit_part(self, bucket, key, upload_id, part, tmp):
        with self.lock:
            try:
                up = self._get_upload(bucket, key, upload_id)
            except OSSError:
                _unlink(tmp)
                raise
            d = self._upload_dir(up)
            os.replace(tmp, os.path.join(d, f"{part.number}.part"))
            _write_json(os.path.join(d, f"{part.number}.json"), asdict(part))
            up.parts[part.number] = part
            return part

    def part_path(self, up, number):
        return os.path.join(self._upload_dir(up), f"{number}.part")

    def abort(self, bucket, key, upload_id):
        with self.lock:
            self.bucket(bucket)
            up = self._get_upload(bucket, key, upload_id)
            del self.uploads[upload_id]
            self._discard_upload_dir(up)

    def complete(self, bucket, key, upload_id, requested, complete_all=False, forbid_overwrite=False, headers=None):
        """requested: [(part_number, etag)] as sent; headers: set on Complete (the ACL), laid over
        Initiate's; returns the new ObjectMeta."""
        with self.lock:
            self.bucket(bucket)
            up = self._get_upload(bucket, key, upload_id)
            if complete_all:
                chosen = [up.parts[n] for n in sorted(up.parts)]
                if not chosen:
                    raise OSSError(400, "InvalidPart", "One or more of the specified parts could not be found.")
            else:
                chosen = self._validate_parts(up, requested)
            for p in chosen[:-1]:
                if p.size < MIN_PART_SIZE:
                    raise OSSError(400, "EntityTooSmall",
                                   "Your proposed upload is smaller than the minimum allowed size.",
                                   ec="0042-00000026",
                                   extra={"PartNumber": p.number, "MinSizeAllowed": MIN_PART_SIZE,
                                          "ProposedSize": p.size})
            crc = 0
            for p in chosen:
                crc = CRC64.combine(crc, p.crc64, p.size) if p.size else crc
            meta = ObjectMeta(key=key, size=sum(p.size for p in chosen),
                              etag=multipart_etag([p.etag for p in chosen]), crc64=crc,
                              content_type=up.content_type, mtime=time.time(), type="Multipart",
                              headers={**up.headers, **(headers or {})})
            self.commit_object(bucket, meta, [(self.part_path(up, p.number), p.size) for p in chosen],
                               forbid_overwrite=forbid_overwrite)
            del self.uploads[upload_id]
            self._discard_upload_dir(up)   # what is left: part sidecars and unused parts
        return meta

    @staticmethod
    def _validate_parts(up, requested):
        if not requested:
            raise OSSError(400, "MalformedXML", "The XML you provided was not well-formed "
                           "or did not validate against our published schema.")
        chosen, last = [], 0
        for number, etag in requested:
            if number <= last:
                raise OSSError(400, "InvalidPartOrder",
                               "The list of parts was not in ascending order. Parts list must be "
                               "specified in order by part number.", ec="0042-00000025")
            last = number
            p = up.parts.get(number)
            if p is None or etag.strip().strip('"').upper() != p.etag:
                raise OSSError(400, "InvalidPart",
                               "One or more of the specified parts could not be found or the specified "
                               "entity tag might not have matched the part's entity tag.",
                               ec="0042-00000024", extra={"PartNumber": number, "ETag": etag})
            chosen.append(p)
        return chosen

    def list_parts(self, bucket, key, upload_id, marker, limit):
        with self.lock:
            self.bucket(bucket)
            up = self._get_upload(bucket, key, upload_id)
            numbers = sorted(n for n in up.parts if n > marker)
            return up, [up.parts[n] for n in numbers[:limit]], len(numbers) > limit

    def list_uploads(self, bucket, prefix, key_marker, id_marker, delimiter, limit):
        with self.lock:
            self.bucket(bucket)
            ups = sorted((u for u in self.uploads.values() if u.bucket == bucket and u.key.startswith(prefix)),
                         key=lambda u: (u.key, u.upload_id))
        entries = ((u.key, u) for u in ups
                   if u.key > key_marker or (u.key == key_marker and id_marker and u.upload_id > id_marker))
        return _page(entries, prefix, delimiter, key_marker, limit, "upload")

    def open_uploads(self):
        with self.lock:
            return [(u, sorted(u.parts.values(), key=lambda p: p.number)) for u in self.uploads.values()]

    def object_count(self):
        with self.lock:
            return sum(len(b.objects) for b in self.buckets.values())
