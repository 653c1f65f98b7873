"""Least-privilege RAM policy documents for ossyncd.

The daemon's upload path needs exactly the eight actions in ``UPLOAD_ACTIONS``
(docs/architecture.md §4): no HeadObject, GetObject or ListObjects.  ``upload_policy``
renders them as a RAM policy document for ``ossyncd policy``;
``inline_policy_json`` renders the same document compactly for the STS
AssumeRole ``Policy`` parameter (``credentials.scope_policy_to_prefixes``),
which limits the session to the watched prefixes even when the role allows more.

Resources:
  * object actions on ``acs:oss:*:*:{bucket}/{prefix}*`` for every watch prefix
    (the prefix ``""`` means the whole bucket, ``{bucket}/*``);
  * ``oss:ListMultipartUploads`` is a bucket-level action, so it is granted on
    ``acs:oss:*:*:{bucket}``.

``rrsa_trust_policy`` is the role trust policy for ACK RRSA (``ossyncd policy --rrsa``).

This module depends only on errors.py, so that the CLI can import it cheaply.
"""

from __future__ import annotations

import json
import re
from typing import Iterable

from ossyncd.errors import PolicyError, PolicyTooLong

__all__ = [
    "UPLOAD_ACTIONS",
    "TAGGING_ACTIONS",
    "KMS_ACTIONS",
    "READ_BACK_ACTIONS",
    "OBJECT_ACTIONS",
    "BUCKET_ACTIONS",
    "MAX_INLINE_POLICY_CHARS",
    "PolicyError",
    "PolicyTooLong",
    "object_resources",
    "upload_policy",
    "inline_policy_json",
    "rrsa_trust_policy",
]

#: The eight actions the upload path uses (docs/architecture.md §4), in a stable order.
UPLOAD_ACTIONS: tuple[str, ...] = (
    "oss:PutObject",
    "oss:InitiateMultipartUpload",
    "oss:UploadPart",
    "oss:UploadPartCopy",
    "oss:CompleteMultipartUpload",
    "oss:AbortMultipartUpload",
    "oss:ListMultipartUploads",
    "oss:ListParts",
)

#: Actions whose resource is the bucket itself rather than an object.
BUCKET_ACTIONS: tuple[str, ...] = ("oss:ListMultipartUploads",)

#: Actions whose resource is an object (``bucket/key``).
OBJECT_ACTIONS: tuple[str, ...] = tuple(a for a in UPLOAD_ACTIONS if a not in BUCKET_ACTIONS)

#: Granted only when a watch sets tags: OSS authorizes x-oss-tagging on a write with it.
TAGGING_ACTIONS: tuple[str, ...] = ("oss:PutObjectTagging",)

#: Granted only when a watch uses server_side_encryption = "KMS": OSS asks KMS for a data key
#: on each write and decrypts it again for each part (docs/wire-protocol.md §8).
KMS_ACTIONS: tuple[str, ...] = ("kms:GenerateDataKey", "kms:Decrypt")

#: Granted only with overwrite != "allow": a 409 FileAlreadyExists is checked with HeadObject
#: (size and CRC64 against our bytes) so that our own object, its record lost in a crash, is
#: not taken for someone else's.
READ_BACK_ACTIONS: tuple[str, ...] = ("oss:GetObject",)

#: STS AssumeRole accepts a Policy of 1..2048 characters (docs/wire-protocol.md §5).
MAX_INLINE_POLICY_CHARS = 2048


def _check_bucket(bucket: str) -> None:
    if not bucket or not isinstance(bucket, str):
        raise PolicyError("oss.bucket is empty; a policy needs the bucket name")
    if "/" in bucket or "*" in bucket or "?" in bucket or ":" in bucket:
        raise PolicyError(f"oss.bucket {bucket!r} is not a plain bucket name")


def _minimal_prefixes(prefixes: Iterable[str]) -> list[str]:
    """Deduplicate, drop prefixes covered by a shorter one, sort.

    ``""`` (the whole bucket) covers everything.  A leading ``/`` is not part of
    an OSS key, so it is stripped.
    """
    cleaned = sorted({(p or "").lstrip("/") for p in prefixes})
    if not cleaned:
        return [""]
    out: list[str] = []
    for p in cleaned:  # sorted: a covering prefix sorts before what it covers
        if any(p.startswith(q) for q in out):
            continue
        out.append(p)
    return out


def object_resources(bucket: str, prefixes: Iterable[str]) -> list[str]:
    """``acs:oss:*:*:{bucket}/{prefix}*`` for each (minimal) prefix."""
    _check_bucket(bucket)
    return [f"acs:oss:*:*:{bucket}/{p}*" for p in _minimal_prefixes(prefixes)]


def upload_policy(bucket: str, prefixes: Iterable[str], *, tagging: bool = False, kms: bool = False,
                  read_back: bool = False) -> dict:
    """The least-privilege RAM policy document for uploading to ``bucket`` under ``prefixes``.

    ``prefixes`` are the watch prefixes; an empty list or a ``""`` prefix means
    the whole bucket. ``tagging`` / ``kms`` / ``read_back``: some watch sets tags / uses
    SSE-KMS / has overwrite other than "allow" (``Config.policy_features``); a plain config
    gets none of them.
    """
    prefixes = list(prefixes)
    statements = [
        {
            "Effect": "Allow",
            "Action": list(OBJECT_ACTIONS) + (list(TAGGING_ACTIONS) if tagging else [])
            + (list(READ_BACK_ACTIONS) if read_back else []),
            "Resource": object_resources(bucket, prefixes),
        },
        {
            "Effect": "Allow",
            "Action": list(BUCKET_ACTIONS),
            "Resource": [f"acs:oss:*:*:{bucket}"],
        },
    ]
    if kms:
        statements.append({"Effect": "Allow", "Action": list(KMS_ACTIONS), "Resource": ["acs:kms:*:*:*"]})
    return {"Version": "1", "Statement": statements}


def inline_policy_json(bucket: str, prefixes: Iterable[str], *, tagging: bool = False, kms: bool = False,
                       read_back: bool = False) -> str:
    """``upload_policy`` as compact JSON for the AssumeRole ``Policy`` parameter.

    Raises ``PolicyTooLong`` (naming the watch prefixes) if it exceeds 2048 characters.
    """
    prefixes = list(prefixes)
    text = json.dumps(upload_policy(bucket, prefixes, tagging=tagging, kms=kms, read_back=read_back), separators=(",", ":"))
    if len(text) > MAX_INLINE_POLICY_CHARS:
        raise PolicyTooLong(
            f"the inline STS policy for watch prefixes {prefixes!r} is {len(text)} characters, "
            f"over the {MAX_INLINE_POLICY_CHARS}-character AssumeRole limit; use fewer or shorter "
            "watch prefixes, or set credentials.scope_policy_to_prefixes = false and restrict "
            "the role's own policy instead"
        )
    return text


_PROVIDER_ARN_RE = re.compile(r"^acs:ram::\d+:oidc-provider/[A-Za-z0-9._-]+$")
_K8S_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def rrsa_trust_policy(provider_arn: str, issuer: str, namespace: str, service_account: str) -> dict:
    """The trust policy of the RAM role an ACK pod assumes with RRSA (AssumeRoleWithOIDC): only
    tokens of this OIDC provider, for STS, for this namespace's service account. PolicyError
    names the bad option."""
    if not _PROVIDER_ARN_RE.match(provider_arn):
        raise PolicyError(f"--oidc-provider-arn {provider_arn!r} is not acs:ram::<account>:oidc-provider/<name>; "
                          "copy it from the cluster's RRSA settings (ack-rrsa-<cluster id>)")
    if not issuer.startswith("https://"):
        raise PolicyError(f"--oidc-issuer {issuer!r} is not an https URL; copy the cluster's issuer URL")
    for opt, value in (("--namespace", namespace), ("--service-account", service_account)):
        if not _K8S_NAME_RE.match(value):
            raise PolicyError(f"{opt} {value!r} is not a Kubernetes name (lower-case a-z, 0-9, '-', '.')")
    return {
        "Version": "1",
        "Statement": [{
            "Effect": "Allow",
            "Action": "sts:AssumeRole",
            "Principal": {"Federated": [provider_arn]},
            "Condition": {"StringEquals": {
                "oidc:aud": "sts.aliyuncs.com",
                "oidc:iss": issuer,
                "oidc:sub": f"system:serviceaccount:{namespace}:{service_account}",
            }},
        }],
    }
