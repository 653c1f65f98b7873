"""Routing: (method, bucket, key, query) -> op name, key validation, and the op table."""

from . import listings, objects, props
from .auth import SUBRESOURCES
from .errors import OSSError


def not_implemented(what):
    return OSSError(501, "NotImplemented", f"{what} is not supported by the emulator.")


def route(req):
    """Return the op name for a request (bucket is set)."""
    m, q = req.method, req.qdict
    extra = {k for k in q if k in SUBRESOURCES and k not in _HARMLESS_SUB}
    if not req.key:
        if m == "GET":
            if "uploads" in q:
                return "ListMultipartUploads"
            if "bucketInfo" in q:
                return "GetBucketInfo"
            if not extra - {"continuation-token"}:
                return "ListObjectsV2" if q.get("list-type") == "2" else "ListObjects"
        raise not_implemented(f"{m} on a bucket with {sorted(extra)}")
    copy = req.header("x-oss-copy-source")
    if m == "PUT":
        if extra == {"uploadId", "partNumber"}:
            return "UploadPartCopy" if copy else "UploadPart"
        if not extra and not copy:
            return "PutObject"
    elif m == "POST":
        if extra == {"uploads"}:
            return "InitiateMultipartUpload"
        if extra == {"uploadId"}:
            return "CompleteMultipartUpload"
    elif m == "DELETE":
        if extra == {"uploadId"}:
            return "AbortMultipartUpload"
        if not extra:
            return "DeleteObject"
    elif m == "GET":
        if extra == {"uploadId"}:
            return "ListParts"
        if extra == {"tagging"}:
            return "GetObjectTagging"
        if extra == {"acl"}:
            return "GetObjectAcl"
        if not extra:
            return "GetObject"
    elif m == "HEAD":
        if extra == {"objectMeta"}:
            return "GetObjectMeta"
        if not extra:
            return "HeadObject"
    raise not_implemented(f"{m} on an object with {sorted(extra)}")


# sub-resources that do not change which operation a request is
_HARMLESS_SUB = {"security-token", "x-oss-traffic-limit", "x-oss-request-payer"} | {
    k for k in SUBRESOURCES if k.startswith("response-")}


def validate_key(key):
    raw = key.encode("utf-8", errors="surrogatepass")
    if not 1 <= len(raw) <= 1023 or key[0] in "/\\":
        raise OSSError(400, "InvalidObjectName", "The specified object is not valid.", ec="0016-00000005",
                       extra={"ObjectName": key[:256]})

OPS = {
    "PutObject": objects.put_object, "UploadPart": objects.upload_part, "UploadPartCopy": objects.upload_part_copy,
    "InitiateMultipartUpload": objects.initiate, "CompleteMultipartUpload": objects.complete,
    "AbortMultipartUpload": objects.abort, "DeleteObject": objects.delete_object, "HeadObject": objects.head_object,
    "GetObjectMeta": objects.get_object_meta, "GetObject": objects.get_object,
    "ListObjects": listings.list_objects, "ListObjectsV2": listings.list_objects_v2,
    "ListMultipartUploads": listings.list_uploads, "ListParts": listings.list_parts,
    "GetBucketInfo": listings.bucket_info,
    "GetObjectTagging": props.get_object_tagging, "GetObjectAcl": props.get_object_acl,
}
