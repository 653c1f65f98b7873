"""A client's inline AssumeRole policy: ossyncd's least-privilege upload policy
(ossyncd.policy) for the client's bucket and registered prefixes, with
ListMultipartUploads, a bucket-level action, narrowed by an ``oss:Prefix`` condition to the
same prefixes (docs/broker.md "Policy"; the emulator evaluates the condition,
docs/wire-protocol.md §5b). The prefixes come from the registration, never the request."""

from __future__ import annotations

import hashlib
import json

from ossyncd.policy import BUCKET_ACTIONS, MAX_INLINE_POLICY_CHARS, PolicyTooLong, upload_policy


def client_policy(bucket: str, prefixes: list[str] | tuple[str, ...], *, prefix_condition: bool = True) -> str:
    """Compact JSON for AssumeRole's Policy; PolicyTooLong when over STS's 2048 characters."""
    doc = upload_policy(bucket, list(prefixes))
    if prefix_condition:
        for st in doc["Statement"]:
            if st["Action"] == list(BUCKET_ACTIONS):
                st["Condition"] = {"StringLike": {"oss:Prefix": [f"{p}*" for p in prefixes]}}
    text = json.dumps(doc, separators=(",", ":"))
    if len(text) > MAX_INLINE_POLICY_CHARS:
        raise PolicyTooLong(f"the inline STS policy for prefixes {list(prefixes)!r} is {len(text)} characters, over "
                            f"the {MAX_INLINE_POLICY_CHARS}-character AssumeRole limit; register fewer or shorter "
                            "prefixes, or set broker.list_prefix_condition = false")
    return text


def policy_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
