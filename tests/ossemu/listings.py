"""Listing operations: ListObjects(V2), ListMultipartUploads, ListParts, GetBucketInfo."""

import base64

from . import xmlfmt as X
from .common import Response, etag, int_param, url_encoded
from .errors import OSSError
from .storage import MAX_PART_NUMBER


def _owner(ctx):
    return f"<Owner><ID>{ctx.authority.account_id}</ID><DisplayName>{ctx.authority.account_id}</DisplayName></Owner>"


def _contents(ctx, meta, url, owner=True):
    return ("<Contents>" + f"<Key>{X.maybe_url(meta.key, url)}</Key>" + X.element("LastModified", X.iso8601(meta.mtime))
            + X.element("ETag", etag(meta.etag)) + X.element("Type", meta.type) + X.element("Size", meta.size)
            + X.element("StorageClass", "Standard") + (_owner(ctx) if owner else "") + "</Contents>")


def _listing_common(req):
    q = req.qdict
    return (q.get("prefix", ""), q.get("delimiter", ""), int_param(q, "max-keys", 100, 1, 1000), url_encoded(q))


def list_objects(ctx, req):
    prefix, delim, limit, url = _listing_common(req)
    marker = req.qdict.get("marker", "")
    items, truncated = ctx.storage.list_objects(req.bucket, prefix, marker, delim, limit)
    body = [X.element("Name", req.bucket), f"<Prefix>{X.maybe_url(prefix, url)}</Prefix>",
            f"<Marker>{X.maybe_url(marker, url)}</Marker>", X.element("MaxKeys", limit),
            f"<Delimiter>{X.maybe_url(delim, url)}</Delimiter>"]
    if url:
        body.append(X.element("EncodingType", "url"))
    body.append(X.element("IsTruncated", X.bool_text(truncated)))
    if truncated:
        last = items[-1]
        body.append(f"<NextMarker>{X.maybe_url(last[1] if last[0] == 'cp' else last[1].key, url)}</NextMarker>")
    body += _render_items(ctx, items, url, owner=True)
    return Response(headers=[("Content-Type", "application/xml")], body=X.document("ListBucketResult", body))


def _render_items(ctx, items, url, owner):
    out = [_contents(ctx, it, url, owner) for kind, it in items if kind == "obj"]
    out += [f"<CommonPrefixes><Prefix>{X.maybe_url(it, url)}</Prefix></CommonPrefixes>"
            for kind, it in items if kind == "cp"]
    return out


def list_objects_v2(ctx, req):
    prefix, delim, limit, url = _listing_common(req)
    q = req.qdict
    token, start_after = q.get("continuation-token", ""), q.get("start-after", "")
    after = start_after
    if token:
        try:
            after = base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise OSSError(400, "InvalidArgument", "The continuation token provided is incorrect.",
                           extra={"ArgumentName": "continuation-token"})
    items, truncated = ctx.storage.list_objects(req.bucket, prefix, after, delim, limit)
    body = [X.element("Name", req.bucket), f"<Prefix>{X.maybe_url(prefix, url)}</Prefix>"]
    if start_after:
        body.append(f"<StartAfter>{X.maybe_url(start_after, url)}</StartAfter>")
    if token:
        body.append(X.element("ContinuationToken", token))
    body += [X.element("MaxKeys", limit), f"<Delimiter>{X.maybe_url(delim, url)}</Delimiter>"]
    if url:
        body.append(X.element("EncodingType", "url"))
    body.append(X.element("IsTruncated", X.bool_text(truncated)))
    if truncated:
        last = items[-1][1] if items[-1][0] == "cp" else items[-1][1].key
        nxt = base64.urlsafe_b64encode(last.encode("utf-8")).decode().rstrip("=")
        body.append(X.element("NextContinuationToken", nxt))
    body.append(X.element("KeyCount", len(items)))
    body += _render_items(ctx, items, url, owner=q.get("fetch-owner") == "true")
    return Response(headers=[("Content-Type", "application/xml")], body=X.document("ListBucketResult", body))


def list_uploads(ctx, req):
    q = req.qdict
    prefix, delim, url = q.get("prefix", ""), q.get("delimiter", ""), url_encoded(q)
    key_marker, id_marker = q.get("key-marker", ""), q.get("upload-id-marker", "")
    limit = int_param(q, "max-uploads", 1000, 1, 1000)
    items, truncated = ctx.storage.list_uploads(req.bucket, prefix, key_marker, id_marker, delim, limit)
    nk, nu = "", ""
    if truncated and items:
        kind, it = items[-1]
        nk, nu = (it, "") if kind == "cp" else (it.key, it.upload_id)
    body = [X.element("Bucket", req.bucket), f"<KeyMarker>{X.maybe_url(key_marker, url)}</KeyMarker>",
            X.element("UploadIdMarker", id_marker), f"<NextKeyMarker>{X.maybe_url(nk, url)}</NextKeyMarker>",
            X.element("NextUploadIdMarker", nu), f"<Delimiter>{X.maybe_url(delim, url)}</Delimiter>",
            f"<Prefix>{X.maybe_url(prefix, url)}</Prefix>", X.element("MaxUploads", limit),
            X.element("IsTruncated", X.bool_text(truncated))]
    if url:
        body.append(X.element("EncodingType", "url"))
    for kind, it in items:
        if kind == "upload":
            body.append(f"<Upload><Key>{X.maybe_url(it.key, url)}</Key>" + X.element("UploadId", it.upload_id)
                        + X.element("StorageClass", "Standard") + X.element("Initiated", X.iso8601(it.initiated))
                        + "</Upload>")
    body += [f"<CommonPrefixes><Prefix>{X.maybe_url(it, url)}</Prefix></CommonPrefixes>"
             for kind, it in items if kind == "cp"]
    return Response(headers=[("Content-Type", "application/xml")],
                    body=X.document("ListMultipartUploadsResult", body))


def list_parts(ctx, req):
    q = req.qdict
    url = url_encoded(q)
    marker = int_param(q, "part-number-marker", 0, 0, MAX_PART_NUMBER)
    limit = int_param(q, "max-parts", 1000, 1, 1000)
    up, parts, truncated = ctx.storage.list_parts(req.bucket, req.key, q["uploadId"], marker, limit)
    nxt = parts[-1].number if parts else marker
    body = [X.element("Bucket", req.bucket), f"<Key>{X.maybe_url(req.key, url)}</Key>",
            X.element("UploadId", up.upload_id), X.element("PartNumberMarker", marker),
            X.element("NextPartNumberMarker", nxt), X.element("MaxParts", limit),
            X.element("IsTruncated", X.bool_text(truncated))]
    if url:
        body.append(X.element("EncodingType", "url"))
    for p in parts:
        body.append("<Part>" + X.element("PartNumber", p.number) + X.element("LastModified", X.iso8601(p.mtime))
                    + X.element("ETag", etag(p.etag)) + X.element("HashCrc64ecma", p.crc64)
                    + X.element("Size", p.size) + "</Part>")
    return Response(headers=[("Content-Type", "application/xml")], body=X.document("ListPartsResult", body))


def bucket_info(ctx, req):
    b = ctx.storage.bucket(req.bucket)
    acct = ctx.authority.account_id
    host = ctx.oss_url.split("//", 1)[-1]
    body = ("<Bucket>" + X.element("Name", b.name) + X.element("CreationDate", X.iso8601(b.created))
            + X.element("StorageClass", "Standard") + X.element("ExtranetEndpoint", host)
            + X.element("IntranetEndpoint", host) + X.element("Location", f"oss-{ctx.region}")
            + X.element("DataRedundancyType", "LRS")
            + f"<Owner><DisplayName>{acct}</DisplayName><ID>{acct}</ID></Owner>"
            + "<AccessControlList><Grant>private</Grant></AccessControlList>" + "</Bucket>")
    return Response(headers=[("Content-Type", "application/xml")], body=X.document("BucketInfo", [body]))
