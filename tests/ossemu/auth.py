"""Principals, STS sessions, OSS V1/V4 signature checks (header and presigned URL), RAM policy.

Principals: `root` (every OSS op), `user` (AssumeRole only), and STS sessions of the
`uploader` role, whose policy allows exactly ROLE_ACTIONS on `acs:oss:*:*:*`, or of the
`uploader-full` role (FULL_ROLE_POLICY: also what ossyncd's policy grants for tags, KMS and
conflict recognition), further narrowed by an inline AssumeRole policy (intersection; an
explicit Deny wins).

Request resources are `acs:oss:<region>:<account>:<bucket>[/<key>]`, so policies written
as `acs:oss:*:*:bucket/prefix/*` or with the account id both match. Like real OSS,
`oss:PutObject` also authorizes the multipart write calls (Initiate/UploadPart/Complete/
UploadPartCopy); the dedicated action names are accepted too.

`Condition` (docs/wire-protocol.md §5b): the operators StringEquals, StringNotEquals,
StringLike and StringNotLike; the one condition key evaluated is `oss:Prefix`, the `prefix`
parameter of ListObjects(V2) and ListMultipartUploads ("" when absent). As in RAM, a
condition on a key the request does not carry does not match, so such an Allow grants
nothing; another operator is refused at AssumeRole (InvalidParameter.PolicyGrammar).
"""

import base64
import binascii
import email.utils
import functools
import hashlib
import hmac
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import quote

from .errors import OSSError

SKEW_SECONDS = 15 * 60
ACCOUNT_ID = "1234567890123456"
ROOT_ID, ROOT_SECRET = "LTAIrootEMU0000000000001", "rootSecretEMU0000000000000000001"
USER_ID, USER_SECRET = "LTAIuserEMU0000000000002", "userSecretEMU0000000000000000002"

ROLE_ACTIONS = ["oss:PutObject", "oss:InitiateMultipartUpload", "oss:UploadPart", "oss:UploadPartCopy",
                "oss:CompleteMultipartUpload", "oss:AbortMultipartUpload", "oss:ListMultipartUploads",
                "oss:ListParts"]
ROLE_POLICY = [{"Effect": "Allow", "Action": ROLE_ACTIONS, "Resource": ["acs:oss:*:*:*"]}]
FULL_ROLE_POLICY = [{"Effect": "Allow", "Action": ROLE_ACTIONS + ["oss:PutObjectTagging", "oss:GetObject"],
                     "Resource": ["acs:oss:*:*:*"]},
                    {"Effect": "Allow", "Action": ["kms:GenerateDataKey", "kms:Decrypt"], "Resource": ["acs:kms:*:*:*"]}]

# op -> (resource level, RAM actions any of which authorizes it)
OP_ACTIONS = {
    "PutObject": ("object", ["oss:PutObject"]),
    "InitiateMultipartUpload": ("object", ["oss:InitiateMultipartUpload", "oss:PutObject"]),
    "UploadPart": ("object", ["oss:UploadPart", "oss:PutObject"]),
    "UploadPartCopy": ("object", ["oss:UploadPartCopy", "oss:PutObject"]),
    "CompleteMultipartUpload": ("object", ["oss:CompleteMultipartUpload", "oss:PutObject"]),
    "AbortMultipartUpload": ("object", ["oss:AbortMultipartUpload"]),
    "ListParts": ("object", ["oss:ListParts"]),
    "ListMultipartUploads": ("bucket", ["oss:ListMultipartUploads"]),
    "HeadObject": ("object", ["oss:GetObject", "oss:HeadObject"]),
    "GetObjectMeta": ("object", ["oss:GetObject", "oss:GetObjectMeta"]),
    "GetObject": ("object", ["oss:GetObject"]),
    "DeleteObject": ("object", ["oss:DeleteObject"]),
    "ListObjects": ("bucket", ["oss:ListObjects"]),
    "ListObjectsV2": ("bucket", ["oss:ListObjects"]),
    "GetBucketInfo": ("bucket", ["oss:GetBucketInfo"]),
    "PutObjectTagging": ("object", ["oss:PutObjectTagging"]),
    "GetObjectTagging": ("object", ["oss:GetObjectTagging"]),
    "GetObjectAcl": ("object", ["oss:GetObjectAcl"]),
}

# oss2's ProviderAuth._subresource_key_set (V1 CanonicalizedResource)
SUBRESOURCES = frozenset("""
response-content-type response-content-language response-cache-control logging response-content-encoding
acl uploadId uploads partNumber group link delete website location objectInfo objectMeta response-expires
response-content-disposition cors lifecycle restore qos referer stat bucketInfo append position security-token
live comp status vod startTime endTime x-oss-process symlink callback callback-var tagging encryption versions
versioning versionId policy requestPayment x-oss-traffic-limit qosInfo asyncFetch x-oss-request-payer sequential
inventory inventoryId continuation-token worm wormId wormExtend replication replicationLocation
replicationProgress transferAcceleration cname metaQuery x-oss-ac-source-ip x-oss-ac-subnet-mask x-oss-ac-vpc-id
x-oss-ac-forward-allow resourceGroup style styleName x-oss-async-process regionList
x-oss-write-get-object-response bucketArchiveDirectRead httpsConfig redundancyTransition
x-oss-target-redundancy-type x-oss-redundancy-transition-taskid accessPoint accessPointPolicy
publicAccessBlock x-oss-access-point-name requesterQosInfo qosRequester resourcePoolInfo resourcePool
resourcePoolBuckets""".split())


@dataclass(frozen=True)
class Principal:
    kind: str                 # root | user | sts
    id: str
    secret: str
    session: object = None

    def __getitem__(self, k):   # also usable as {"id":..., "secret":...}
        return {"id": self.id, "secret": self.secret}[k]


@dataclass
class Session:
    access_key_id: str
    secret: str
    token: str
    expires_at: float
    name: str
    caller: str
    policy: list = None       # inline statements or None
    issued_at: float = field(default_factory=time.time)
    role_policy: list = None  # the assumed role's statements


# ---------------------------------------------------------------- policy
@functools.lru_cache(maxsize=4096)
def _wild_re(pattern, ci):
    rx = "^" + ".*".join(re.escape(p) for p in pattern.split("*")) + "$"
    return re.compile(rx, re.DOTALL | (re.IGNORECASE if ci else 0))


def _as_list(v):
    return [v] if isinstance(v, str) else list(v)


CONDITION_OPERATORS = ("StringEquals", "StringNotEquals", "StringLike", "StringNotLike")


def _condition_holds(condition, context):
    """Every operator and key must hold; a key the request does not carry fails (RAM's rule)."""
    for op, pairs in (condition or {}).items():
        for key, values in pairs.items():
            have = context.get(key.lower())
            if have is None:
                return False
            values = _as_list(values)
            if op in ("StringEquals", "StringNotEquals"):
                hit = have in values
            else:
                hit = any(_wild_re(v, False).match(have) for v in values)
            if hit == op.startswith("StringNot"):
                return False
    return True


def policy_allows(statements, actions, resource, context=None):
    """`context`: the request's condition keys, lower-case (`oss:prefix`)."""
    allowed = False
    for st in statements:
        if not any(_wild_re(a, True).match(x) for a in _as_list(st["Action"]) for x in actions):
            continue
        if not any(_wild_re(r, False).match(resource) for r in _as_list(st["Resource"])):
            continue
        if "Condition" in st and not _condition_holds(st["Condition"], context or {}):
            continue
        if st["Effect"] == "Deny":
            return False
        allowed = True
    return allowed


def parse_policy(text):
    """Validate an inline policy; return its statements or raise ValueError."""
    doc = json.loads(text)
    if not isinstance(doc, dict) or set(doc) - {"Version", "Statement"}:
        raise ValueError("policy must be an object with Version and Statement")
    if "Version" in doc and doc["Version"] != "1":
        raise ValueError("Version must be \"1\"")
    sts = doc.get("Statement")
    sts = [sts] if isinstance(sts, dict) else sts
    if not isinstance(sts, list) or not sts:
        raise ValueError("Statement must be a non-empty list")
    for st in sts:
        if not isinstance(st, dict) or set(st) - {"Effect", "Action", "Resource", "Condition", "Sid"}:
            raise ValueError("bad statement")
        if st.get("Effect") not in ("Allow", "Deny"):
            raise ValueError("Effect must be Allow or Deny")
        for k in ("Action", "Resource"):
            v = st.get(k)
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
                raise ValueError(f"{k} must be a string or a non-empty list of strings")
        cond = st.get("Condition", {})
        if not isinstance(cond, dict) or not all(
                op in CONDITION_OPERATORS and isinstance(pairs, dict) and pairs and all(
                    isinstance(k, str) and (isinstance(v, str) or (isinstance(v, list) and v and all(
                        isinstance(x, str) for x in v))) for k, v in pairs.items())
                for op, pairs in cond.items()):
            raise ValueError("Condition must map a supported operator to {key: string or list of strings}")
    return sts


# ---------------------------------------------------------------- helpers
def _b(s):
    """Header values arrive latin-1 decoded; recover their raw bytes."""
    return s.encode("latin-1", errors="replace") if isinstance(s, str) else s


def _parse_date(value):
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _denied(message, ec=None):
    return OSSError(403, "AccessDenied", message, ec=ec)


def _mismatch(ak, string_to_sign, extra=None):
    details = {"OSSAccessKeyId": ak, "StringToSign": string_to_sign.decode("utf-8", "replace")}
    details.update(extra or {})
    if sum(len(v) for v in details.values()) > 2500:
        details = {"OSSAccessKeyId": ak}
    return OSSError(403, "SignatureDoesNotMatch",
                    "The request signature we calculated does not match the signature you provided. "
                    "Check your key and signing method.", ec="0002-00000040", extra=details)


def v4_encode(s, keep_slash=False):
    return quote(s, safe="/" if keep_slash else "")


def v4_signing_key(secret, date, region, product="oss"):
    k = hmac.new(("aliyun_v4" + secret).encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, product, "aliyun_v4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    return k


# ---------------------------------------------------------------- authority
class Authority:
    def __init__(self, region, account_id=ACCOUNT_ID, clock=time.time):
        self.region = region
        self.account_id = account_id
        self.clock = clock
        self.root = Principal("root", ROOT_ID, ROOT_SECRET)
        self.user = Principal("user", USER_ID, USER_SECRET)
        self.static = {p.id: p for p in (self.root, self.user)}
        self.role_arn = f"acs:ram::{account_id}:role/uploader"
        # a second role whose sessions may assume `uploader` (role chaining, ChainableRamRoleArn)
        self.relay_role_arn = f"acs:ram::{account_id}:role/relay"
        self.full_role_arn = f"acs:ram::{account_id}:role/uploader-full"
        self.roles = {self.role_arn: ROLE_POLICY, self.full_role_arn: FULL_ROLE_POLICY,
                      self.relay_role_arn: ROLE_POLICY}
        self._lock = threading.Lock()
        self._by_token = {}
        self._by_ak = {}

    # ----- sessions
    def issue(self, caller, name, duration, policy=None, role_policy=None):
        now = self.clock()
        ak = "STS." + base64.b32encode(os.urandom(15)).decode().rstrip("=")[:24]
        secret = base64.b64encode(os.urandom(30)).decode().replace("+", "A").replace("/", "B")
        token = "CAIS" + base64.b64encode(os.urandom(300)).decode()
        s = Session(ak, secret, token, now + duration, name, caller, policy, now, role_policy or ROLE_POLICY)
        with self._lock:
            self._by_token[token] = s
            self._by_ak[ak] = s
        return s

    def session(self, ak, token):
        """The live session holding this AccessKeyId and token, or None."""
        with self._lock:
            s = self._by_token.get(token)
        if s is None or s.access_key_id != ak or s.expires_at <= self.clock():
            return None
        return s

    def expire_all(self):
        now = self.clock()
        with self._lock:
            for s in self._by_token.values():
                s.expires_at = min(s.expires_at, now)
            return len(self._by_token)

    # ----- authentication
    def authenticate(self, req):
        """Verify the request's signature; return the Principal or raise OSSError."""
        auth = req.header("authorization")
        if auth is None:
            if req.qdict.get("OSSAccessKeyId") is not None:
                return self._presigned_v1(req)
            if req.qdict.get("x-oss-signature") is not None:
                return self._presigned_v4(req)
            raise _denied("You have no right to access this object because of bucket acl.", "0003-00000001")
        if auth.startswith("OSS4-HMAC-SHA256 "):
            return self._header_v4(req, auth)
        if auth.startswith("OSS "):
            return self._header_v1(req, auth)
        raise OSSError(400, "InvalidArgument", "Authorization header is invalid.", ec="0002-00000201",
                       extra={"ArgumentName": "Authorization", "ArgumentValue": auth[:64]})

    def _check_skew(self, ts, raw):
        if ts is None:
            raise _denied("The Date header or x-oss-date header is missing or not in a valid format.",
                          "0002-00000503")
        now = self.clock()
        if abs(now - ts) > SKEW_SECONDS:
            raise OSSError(403, "RequestTimeTooSkewed",
                           "The difference between the request time and the current time is too large.",
                           ec="0002-00000504",
                           extra={"RequestTime": raw, "ServerTime": time.strftime(
                               "%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now))})

    def _resolve(self, ak, token):
        """AccessKeyId (+ security token) -> Principal, before the signature is checked."""
        if token:
            with self._lock:
                s = self._by_token.get(token)
            if s is None:
                raise _invalid_token("The security token you provided is invalid.", "0002-00000006")
            if s.expires_at <= self.clock():
                raise OSSError(403, "SecurityTokenExpired", "The security token you provided has expired.",
                               ec="0002-00000007")
            if s.access_key_id != ak:
                if not ak.startswith("STS."):
                    raise _invalid_ak(ak, "0002-00000002")
                raise _invalid_token("The security token you provided does not match the AccessKeyId.",
                                     "0002-00000004")
            return Principal("sts", s.access_key_id, s.secret, s)
        p = self.static.get(ak)
        if p is None:
            raise _invalid_ak(ak, "0002-00000002" if ak.startswith("STS.") else "0002-00000001")
        return p

    def _header_v1(self, req, auth):
        ak, sep, sig = auth[4:].strip().rpartition(":")
        if not sep or not ak:
            raise OSSError(400, "InvalidArgument", "Authorization header is invalid.", ec="0002-00000201")
        date = req.header("x-oss-date") or req.header("date")
        self._check_skew(_parse_date(date), date)
        p = self._resolve(ak, req.header("x-oss-security-token"))
        sts = self.v1_string_to_sign(req, date)
        want = base64.b64encode(hmac.new(p.secret.encode(), sts, hashlib.sha1).digest()).decode()
        if not hmac.compare_digest(want, sig):
            raise _mismatch(ak, sts)
        return p

    def _presigned_v1(self, req):
        q = req.qdict
        ak, expires, sig = q.get("OSSAccessKeyId"), q.get("Expires", ""), q.get("Signature", "")
        if not expires.isdigit():
            raise _denied("Invalid Expires parameter.")
        if int(expires) < self.clock():
            raise OSSError(403, "AccessDenied", "Request has expired.", ec="0002-00000069",
                           extra={"Expires": expires})
        p = self._resolve(ak, q.get("security-token"))
        sts = self.v1_string_to_sign(req, expires)
        want = base64.b64encode(hmac.new(p.secret.encode(), sts, hashlib.sha1).digest()).decode()
        if not hmac.compare_digest(want, sig):
            raise _mismatch(ak, sts)
        return p

    @staticmethod
    def v1_string_to_sign(req, date):
        canon = sorted((k.lower(), v) for k, v in req.headers if k.lower().startswith("x-oss-"))
        hdrs = b"".join(k.encode() + b":" + _b(v) + b"\n" for k, v in canon)
        resource = "/" if req.bucket is None else f"/{req.bucket}/{req.key}"
        sub = sorted((k, v) for k, v in req.qdict.items() if k in SUBRESOURCES)
        if sub:
            resource += "?" + "&".join(f"{k}={v}" if v else k for k, v in sub)
        return b"\n".join([req.method.encode(), _b(req.header("content-md5") or ""),
                           _b(req.header("content-type") or ""), _b(date or ""),
                           hdrs + resource.encode("utf-8")])

    def _header_v4(self, req, auth):
        fields = {}
        for item in auth[len("OSS4-HMAC-SHA256 "):].split(","):
            k, sep, v = item.strip().partition("=")
            if not sep or k not in ("Credential", "Signature", "AdditionalHeaders"):
                raise OSSError(400, "InvalidArgument", "Authorization header is invalid.", ec="0002-00000204")
            fields[k] = v.strip()
        if "Credential" not in fields or "Signature" not in fields:
            raise OSSError(400, "InvalidArgument", "Authorization header is invalid.", ec="0002-00000202")
        date = req.header("x-oss-date")
        return self._verify_v4(req, fields["Credential"], fields["Signature"], date,
                               fields.get("AdditionalHeaders", ""), req.header("x-oss-security-token"),
                               req.header("x-oss-content-sha256") or "UNSIGNED-PAYLOAD",
                               exclude_query=None, presigned_expires=None)

    def _presigned_v4(self, req):
        q = req.qdict
        if q.get("x-oss-signature-version") != "OSS4-HMAC-SHA256":
            raise OSSError(400, "InvalidArgument", "Invalid x-oss-signature-version.")
        expires = q.get("x-oss-expires", "")
        if not expires.isdigit():
            raise OSSError(400, "InvalidArgument", "Invalid x-oss-expires.")
        return self._verify_v4(req, q.get("x-oss-credential", ""), q.get("x-oss-signature", ""),
                               q.get("x-oss-date"), q.get("x-oss-additional-headers", ""),
                               q.get("x-oss-security-token"), "UNSIGNED-PAYLOAD",
                               exclude_query="x-oss-signature", presigned_expires=int(expires))

    def _verify_v4(self, req, credential, signature, date, additional, token, payload_hash,
                   exclude_query, presigned_expires):
        parts = credential.split("/")
        if len(parts) != 5 or parts[3] not in ("oss", "oss-cloudbox") or parts[4] != "aliyun_v4_request":
            raise OSSError(400, "InvalidArgument", "Invalid credential in Authorization header.",
                           ec="0002-00000213", extra={"ArgumentValue": credential})
        ak, scope_date, region, product, _ = parts
        ts = _parse_date(date) if date and len(date) == 16 else None
        if presigned_expires is None:
            self._check_skew(ts, date)
        elif ts is None:
            raise OSSError(400, "InvalidArgument", "Invalid x-oss-date.")
        elif ts + presigned_expires < self.clock():
            raise OSSError(403, "AccessDenied", "Request has expired.", ec="0002-00000069")
        if scope_date != date[:8]:
            raise OSSError(400, "InvalidArgument", "Invalid signing date in Authorization header.",
                           ec="0002-00000212", extra={"ArgumentValue": credential})
        if region != self.region:
            raise OSSError(400, "InvalidArgument", "Invalid signing region in Authorization header.",
                           ec="0002-00000228", extra={"ArgumentValue": credential,
                                                      "ExpectedRegion": self.region})
        p = self._resolve(ak, token)
        extra = sorted(h.strip().lower() for h in additional.split(";") if h.strip())
        uri = "/" if req.bucket is None else f"/{req.bucket}/{req.key}"
        query = sorted((v4_encode(k), v4_encode(v)) for k, v in req.qdict.items() if k != exclude_query)
        canon_q = "&".join(f"{k}={v}" if v else k for k, v in query)
        hdrs = sorted((k.lower(), v) for k, v in req.headers
                      if k.lower().startswith("x-oss-") or k.lower() in ("content-type", "content-md5")
                      or k.lower() in extra)
        canon_h = b"".join(k.encode() + b":" + _b(v) + b"\n" for k, v in hdrs)
        creq = b"\n".join([req.method.encode(), v4_encode(uri, True).encode(), canon_q.encode(), canon_h,
                           ";".join(extra).encode(), payload_hash.encode()])
        sts = "\n".join(["OSS4-HMAC-SHA256", date, f"{scope_date}/{region}/{product}/aliyun_v4_request",
                         hashlib.sha256(creq).hexdigest()]).encode()
        want = hmac.new(v4_signing_key(p.secret, scope_date, region, product), sts, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, signature):
            raise _mismatch(ak, sts, {"CanonicalRequest": creq.decode("utf-8", "replace")})
        return p

    # ----- authorization
    def resource(self, bucket, key=None):
        base = f"acs:oss:{self.region}:{self.account_id}:{bucket}"
        return base if key is None else f"{base}/{key}"

    def authorize(self, p, op, bucket, key, prefix=None):
        """`prefix`: a listing's `prefix` parameter, the value of the `oss:Prefix` condition key."""
        if p.kind == "root":
            return
        level, actions = OP_ACTIONS.get(op, ("object", ["oss:" + op]))
        res = self.resource(bucket, key if level == "object" else None)
        context = {"oss:prefix": prefix} if prefix is not None else {}
        if p.kind == "sts":
            if policy_allows(p.session.role_policy, actions, res, context) and (
                    p.session.policy is None or policy_allows(p.session.policy, actions, res, context)):
                return
        raise _denied(f"You are not authorized to do {actions[0]} on {res}.", "0003-00000301")

    def authorize_kms(self, p, actions, key_id):
        """Every one of `actions` on the KMS key (an SSE-KMS write asks KMS for a data key)."""
        if p.kind == "root":
            return
        res = f"acs:kms:{self.region}:{self.account_id}:key/{key_id}"
        for action in actions:
            if not (p.kind == "sts" and policy_allows(p.session.role_policy, [action], res) and (
                    p.session.policy is None or policy_allows(p.session.policy, [action], res))):
                raise _denied(f"You are not authorized to do {action} on {res}; the write asked for "
                              f"SSE-KMS.", "0003-00000301")


def _invalid_ak(ak, ec):
    return OSSError(403, "InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist in our records.",
                    ec=ec, extra={"OSSAccessKeyId": ak})


def _invalid_token(message, ec):
    return OSSError(403, "InvalidSecurityToken", message, ec=ec)


def sign_v1(secret, string_to_sign):
    """Helper for tests/bench: base64(HMAC-SHA1(secret, StringToSign))."""
    if isinstance(string_to_sign, str):
        string_to_sign = string_to_sign.encode()
    return base64.b64encode(hmac.new(secret.encode(), string_to_sign, hashlib.sha1).digest()).decode()


def content_md5_ok(header, digest):
    try:
        return base64.b64decode(header, validate=True) == digest
    except (binascii.Error, ValueError):
        return False
