"""Object properties: storage class, encryption, ACL and tags, checked on a write like OSS
and returned on HEAD/GET, ?tagging and ?acl (docs/wire-protocol.md §8).

Codes where OSS names one: an unknown storage class or ACL is 400 InvalidArgument; an
unknown encryption is 400 InvalidEncryptionAlgorithmError; a key id without KMS is 400
InvalidArgument; more than 10 tags, an empty or over-128-character key, an over-256-character
value or a repeated key is 400 InvalidTag. x-oss-tagging on a write also needs
oss:PutObjectTagging, and SSE-KMS needs kms:GenerateDataKey and kms:Decrypt (on
`acs:kms:REGION:ACCOUNT:key/ID`, `key/default` without a key id), else 403 AccessDenied.
"""

from urllib.parse import parse_qsl

from . import xmlfmt as X
from .common import Response
from .errors import OSSError

STORAGE_CLASSES = ("Standard", "IA", "Archive", "ColdArchive", "DeepColdArchive")
SSE_VALUES = ("AES256", "KMS", "SM4")
ACLS = ("default", "private", "public-read", "public-read-write")
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE = 10, 128, 256
KMS_ACTIONS = ("kms:GenerateDataKey", "kms:Decrypt")
# stored with the object: HEAD/GET return the first group, ?tagging and ?acl the rest
STORED = ("x-oss-storage-class", "x-oss-server-side-encryption", "x-oss-server-side-encryption-key-id",
          "x-oss-object-acl", "x-oss-tagging")


def _invalid(message, name, value):
    return OSSError(400, "InvalidArgument", message, extra={"ArgumentName": name, "ArgumentValue": value})


def parse_tags(raw):
    """x-oss-tagging (URL-encoded k=v&k=v) -> [(k, v)], or InvalidTag."""
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=True) if raw else []
    except ValueError:
        raise OSSError(400, "InvalidTag", "The tag provided was not a valid tag.") from None
    keys = [k for k, _ in pairs]
    if len(pairs) > MAX_TAGS:
        raise OSSError(400, "InvalidTag", f"Object tags cannot be greater than {MAX_TAGS}.")
    if len(set(keys)) != len(keys):
        raise OSSError(400, "InvalidTag", "Cannot provide multiple tags with the same key.")
    for k, v in pairs:
        if not 1 <= len(k) <= MAX_TAG_KEY or len(v) > MAX_TAG_VALUE:
            raise OSSError(400, "InvalidTag", "The TagKey or TagValue you have provided is invalid.",
                           extra={"TagKey": k[:MAX_TAG_KEY]})
    return pairs


def check_write(ctx, req):
    """Validate and authorize the property headers of a PutObject or InitiateMultipartUpload."""
    sc = req.header("x-oss-storage-class")
    if sc is not None and sc not in STORAGE_CLASSES:
        raise _invalid("The storage class you specified is not valid.", "x-oss-storage-class", sc)
    acl = req.header("x-oss-object-acl")
    if acl is not None and acl not in ACLS:
        raise _invalid("no such object access control exists", "x-oss-object-acl", acl)
    sse = req.header("x-oss-server-side-encryption")
    key_id = req.header("x-oss-server-side-encryption-key-id")
    if sse is not None and sse not in SSE_VALUES:
        raise OSSError(400, "InvalidEncryptionAlgorithmError", "The Encryption request you specified is not valid. "
                       "Supported value: AES256/KMS/SM4", extra={"ArgumentName": "x-oss-server-side-encryption"})
    if key_id is not None and sse != "KMS":
        raise _invalid("x-oss-server-side-encryption-key-id is only allowed with KMS.",
                       "x-oss-server-side-encryption-key-id", key_id)
    tagging = req.header("x-oss-tagging")
    if tagging is not None:
        parse_tags(tagging)
        ctx.authority.authorize(req.principal, "PutObjectTagging", req.bucket, req.key)
    if sse == "KMS":
        ctx.authority.authorize_kms(req.principal, KMS_ACTIONS, key_id or "default")


def response_headers(headers):
    """What HEAD and GET return from the stored properties (no tags or ACL themselves)."""
    out = [("x-oss-storage-class", headers.get("x-oss-storage-class", "Standard"))]
    for k in ("x-oss-server-side-encryption", "x-oss-server-side-encryption-key-id"):
        if k in headers:
            out.append((k, headers[k]))
    if "x-oss-server-side-encryption" in headers and headers["x-oss-server-side-encryption"] == "KMS" and \
            "x-oss-server-side-encryption-key-id" not in headers:
        out.append(("x-oss-server-side-encryption-key-id", "default"))
    if headers.get("x-oss-tagging"):
        out.append(("x-oss-tagging-count", str(len(parse_tags(headers["x-oss-tagging"])))))
    return out


def get_object_tagging(ctx, req):
    meta = ctx.storage.head(req.bucket, req.key)
    tags = "".join(f"<Tag>{X.element('Key', k)}{X.element('Value', v)}</Tag>"
                   for k, v in parse_tags(meta.headers.get("x-oss-tagging", "")))
    return Response(headers=[("Content-Type", "application/xml")],
                    body=X.document("Tagging", [f"<TagSet>{tags}</TagSet>"]))


def get_object_acl(ctx, req):
    meta = ctx.storage.head(req.bucket, req.key)
    acl = meta.headers.get("x-oss-object-acl", "default")
    owner = f"<Owner>{X.element('ID', ctx.authority.account_id)}{X.element('DisplayName', ctx.authority.account_id)}</Owner>"
    return Response(headers=[("Content-Type", "application/xml")],
                    body=X.document("AccessControlPolicy",
                                    [owner, f"<AccessControlList>{X.element('Grant', acl)}</AccessControlList>"]))
