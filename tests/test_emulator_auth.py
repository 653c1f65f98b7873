"""Emulator: OSS authentication and authorization (V1, V4, STS tokens, inline policies)."""

import base64
import email.utils
import hashlib
import hmac
import time

import oss2
import pytest
import requests
from oss2.credentials import StaticCredentialsProvider

pytestmark = pytest.mark.timeout(60)
PART = 100 * 1024


def bucket_for(emu, key_id, secret, token=None, version="v1"):
    if version == "v1":
        auth = oss2.ProviderAuth(StaticCredentialsProvider(key_id, secret, token))
    else:
        auth = oss2.ProviderAuthV4(StaticCredentialsProvider(key_id, secret, token))
    return oss2.Bucket(auth, emu.oss_url, "drop", region=emu.region)


def server_error(fn, *a, **kw):
    with pytest.raises(oss2.exceptions.OssError) as ei:
        fn(*a, **kw)
    return ei.value


def v1_request(emu, method, key, date, secret=None, body=b""):
    """A hand-signed V1 request with `requests` (independent of oss2's signer)."""
    sts = f"{method}\n\n\n{date}\n/drop/{key}"
    sig = base64.b64encode(hmac.new((secret or emu.root.secret).encode(), sts.encode(), hashlib.sha1).digest())
    headers = {"Date": date, "Authorization": f"OSS {emu.root.id}:{sig.decode()}"}
    return requests.request(method, f"{emu.oss_url}/drop/{key}", headers=headers, data=body)


@pytest.mark.parametrize("version", ["v1", "v4"])
def test_wrong_secret_and_unknown_key(emulator, version):
    e = server_error(bucket_for(emulator, emulator.root.id, "wrong", version=version).put_object, "k", b"x")
    assert isinstance(e, oss2.exceptions.SignatureDoesNotMatch) and e.status == 403
    e = server_error(bucket_for(emulator, "LTAInoSuchKey", "x", version=version).put_object, "k", b"x")
    assert (e.status, e.code) == (403, "InvalidAccessKeyId")


def test_tampered_requests(emulator):
    class TamperSig(oss2.Auth):
        def _sign_request(self, req, bucket_name, key):
            super()._sign_request(req, bucket_name, key)
            req.headers["authorization"] = req.headers["authorization"][:-2] + "AA"

    class TamperHeader(oss2.Auth):
        def _sign_request(self, req, bucket_name, key):
            super()._sign_request(req, bucket_name, key)
            req.headers["x-oss-meta-owner"] = "mallory"

    for auth in (TamperSig(emulator.root.id, emulator.root.secret),
                 TamperHeader(emulator.root.id, emulator.root.secret)):
        b = oss2.Bucket(auth, emulator.oss_url, "drop")
        e = server_error(b.put_object, "k", b"x", headers={"x-oss-meta-owner": "alice"})
        assert isinstance(e, oss2.exceptions.SignatureDoesNotMatch)


def test_anonymous_and_user_key_denied(emulator):
    b = oss2.Bucket(oss2.AnonymousAuth(), emulator.oss_url, "drop")
    assert isinstance(server_error(b.put_object, "k", b"x"), oss2.exceptions.AccessDenied)
    for version in ("v1", "v4"):
        b = bucket_for(emulator, emulator.user.id, emulator.user.secret, version=version)
        assert isinstance(server_error(b.put_object, "k", b"x"), oss2.exceptions.AccessDenied)
        assert isinstance(server_error(b.init_multipart_upload, "k"), oss2.exceptions.AccessDenied)


def test_clock_skew(emulator):
    now = time.time()
    ok = v1_request(emulator, "PUT", "skew", email.utils.formatdate(now, usegmt=True), body=b"x")
    assert ok.status_code == 200, ok.text
    for off in (-20 * 60, 20 * 60):
        r = v1_request(emulator, "PUT", "skew", email.utils.formatdate(now + off, usegmt=True), body=b"x")
        assert r.status_code == 403 and "<Code>RequestTimeTooSkewed</Code>" in r.text
        assert r.headers["x-oss-ec"] == "0002-00000504"


def test_v4_wrong_region(emulator):
    b = oss2.Bucket(oss2.AuthV4(emulator.root.id, emulator.root.secret), emulator.oss_url, "drop",
                    region="cn-shanghai")
    e = server_error(b.put_object, "k", b"x")
    assert isinstance(e, oss2.exceptions.InvalidArgument) and e.status == 400 and e.ec == "0002-00000228"

    class YesterdayScope(oss2.AuthV4):
        def _sign_request(self, req, bucket_name, key, in_additional_headers=None):
            super()._sign_request(req, bucket_name, key, in_additional_headers)
            req.headers["authorization"] = req.headers["authorization"].replace(
                req.headers["x-oss-date"][:8], "20000101")

    b = oss2.Bucket(YesterdayScope(emulator.root.id, emulator.root.secret), emulator.oss_url, "drop",
                    region=emulator.region)
    e = server_error(b.put_object, "k", b"x")
    assert isinstance(e, oss2.exceptions.InvalidArgument) and e.ec == "0002-00000212"


@pytest.mark.parametrize("version", ["v1", "v4"])
def test_sts_allowed_and_denied_ops(emulator, root_bucket, sts_credentials, version):
    c = sts_credentials(session_name=f"ops-{version}")
    assert c["AccessKeyId"].startswith("STS.")
    b = bucket_for(emulator, c["AccessKeyId"], c["AccessKeySecret"], c["SecurityToken"], version)
    assert b.put_object("sts/a", b"hello").status == 200
    up = b.init_multipart_upload("sts/mp").upload_id
    p1 = b.upload_part("sts/mp", up, 1, b"1" * PART)
    p2 = b.upload_part("sts/mp", up, 2, b"2")
    assert [p.part_number for p in oss2.PartIterator(b, "sts/mp", up)] == [1, 2]
    assert [u.upload_id for u in oss2.MultipartUploadIterator(b)] == [up]
    b.complete_multipart_upload("sts/mp", up, [oss2.models.PartInfo(1, p1.etag), oss2.models.PartInfo(2, p2.etag)])
    up2 = b.init_multipart_upload("sts/ab").upload_id
    assert b.abort_multipart_upload("sts/ab", up2).status == 204
    assert root_bucket.get_object("sts/mp").read() == b"1" * PART + b"2"

    for fn, args in [(b.get_object, ("sts/a",)), (b.head_object, ("sts/a",)), (b.delete_object, ("sts/a",)),
                     (b.list_objects, ()), (b.list_objects_v2, ()), (b.get_object_meta, ("sts/a",)),
                     (b.get_bucket_info, ())]:
        e = server_error(fn, *args)
        assert isinstance(e, oss2.exceptions.AccessDenied), (fn.__name__, e)
    assert root_bucket.object_exists("sts/a")


def test_sts_auth_classes(emulator, sts_credentials):
    c = sts_credentials()
    for auth in (oss2.StsAuth(c["AccessKeyId"], c["AccessKeySecret"], c["SecurityToken"]),
                 oss2.StsAuth(c["AccessKeyId"], c["AccessKeySecret"], c["SecurityToken"], auth_version="v4")):
        b = oss2.Bucket(auth, emulator.oss_url, "drop", region=emulator.region)
        assert b.put_object("sts/x", b"x").status == 200


@pytest.mark.timeout(30)
def test_expired_tokens(emulator, sts_credentials):
    short = sts_credentials(duration=1, session_name="short")
    long_ = sts_credentials(duration=3600, session_name="long")
    b_long = bucket_for(emulator, long_["AccessKeyId"], long_["AccessKeySecret"], long_["SecurityToken"], "v4")
    assert b_long.put_object("t", b"ok").status == 200
    time.sleep(1.2)
    for version in ("v1", "v4"):
        b = bucket_for(emulator, short["AccessKeyId"], short["AccessKeySecret"], short["SecurityToken"], version)
        e = server_error(b.put_object, "t", b"late")
        assert (e.status, e.code, e.ec) == (403, "SecurityTokenExpired", "0002-00000007")
        assert e.message == "The security token you provided has expired."
    r = requests.post(f"{emulator.oss_url}/-/expire-tokens")
    assert r.status_code == 200
    e = server_error(b_long.upload_part, "t", "0" * 32, 1, b"x")
    assert (e.code, e.ec) == ("SecurityTokenExpired", "0002-00000007")
    fresh = sts_credentials(session_name="fresh")  # new tokens work again
    assert bucket_for(emulator, fresh["AccessKeyId"], fresh["AccessKeySecret"],
                      fresh["SecurityToken"]).put_object("t", b"new").status == 200


def test_mismatched_and_missing_tokens(emulator, sts_credentials):
    a = sts_credentials(session_name="sess-a")
    b = sts_credentials(session_name="sess-b")
    assert len({a["SecurityToken"], b["SecurityToken"]}) == 2 and a["AccessKeyId"] != b["AccessKeyId"]
    e = server_error(bucket_for(emulator, a["AccessKeyId"], a["AccessKeySecret"], b["SecurityToken"]).put_object,
                     "k", b"x")
    assert (e.status, e.code) == (403, "InvalidSecurityToken")
    e = server_error(bucket_for(emulator, a["AccessKeyId"], a["AccessKeySecret"]).put_object, "k", b"x")
    assert (e.status, e.code) == (403, "InvalidAccessKeyId")
    e = server_error(bucket_for(emulator, a["AccessKeyId"], a["AccessKeySecret"], "CAISbogus").put_object, "k", b"x")
    assert (e.status, e.code) == (403, "InvalidSecurityToken")
    e = server_error(bucket_for(emulator, a["AccessKeyId"], "wrong", a["SecurityToken"]).put_object, "k", b"x")
    assert isinstance(e, oss2.exceptions.SignatureDoesNotMatch)
    e = server_error(bucket_for(emulator, emulator.root.id, emulator.root.secret, a["SecurityToken"]).put_object,
                     "k", b"x")
    assert (e.status, e.code) == (403, "InvalidAccessKeyId")


def test_inline_policy_restricts_prefix(emulator, sts_credentials):
    policy = {"Version": "1", "Statement": [
        {"Effect": "Allow", "Action": ["oss:PutObject", "oss:ListParts", "oss:AbortMultipartUpload"],
         "Resource": ["acs:oss:*:*:drop/incoming/*"]},
        {"Effect": "Deny", "Action": "oss:*", "Resource": "acs:oss:*:*:drop/incoming/secret*"},
        {"Effect": "Allow", "Action": "oss:GetObject", "Resource": "acs:oss:*:*:*"},  # role does not allow it
    ]}
    c = sts_credentials(policy=policy, session_name="scoped")
    for version in ("v1", "v4"):
        b = bucket_for(emulator, c["AccessKeyId"], c["AccessKeySecret"], c["SecurityToken"], version)
        assert b.put_object("incoming/a b+c", b"x").status == 200
        up = b.init_multipart_upload("incoming/mp").upload_id  # oss:PutObject covers multipart writes
        b.upload_part("incoming/mp", up, 1, b"x")
        b.abort_multipart_upload("incoming/mp", up)
        for key in ("outside", "incomingX/a", "incoming/secret.txt"):
            assert isinstance(server_error(b.put_object, key, b"x"), oss2.exceptions.AccessDenied), key
        assert isinstance(server_error(b.get_object, "incoming/a b+c"), oss2.exceptions.AccessDenied)
        assert isinstance(server_error(b.list_multipart_uploads), oss2.exceptions.AccessDenied)


def test_inline_policy_prefix_condition_on_listings(emulator, sts_credentials):
    """`oss:Prefix` is the listing's `prefix` parameter; StringLike narrows ListMultipartUploads
    and ListObjects, StringNotLike excludes, and an unsupported operator is a grammar error."""
    policy = {"Version": "1", "Statement": [
        {"Effect": "Allow", "Action": ["oss:ListMultipartUploads"], "Resource": ["acs:oss:*:*:drop"],
         "Condition": {"StringLike": {"oss:Prefix": ["cam1/*", "cam2/*"]}}},
        {"Effect": "Deny", "Action": ["oss:ListMultipartUploads"], "Resource": ["acs:oss:*:*:drop"],
         "Condition": {"StringLike": {"oss:Prefix": ["cam2/private/*"]}}},
    ]}
    c = sts_credentials(policy=policy, session_name="listing")
    b = bucket_for(emulator, c["AccessKeyId"], c["AccessKeySecret"], c["SecurityToken"], "v4")
    for prefix in ("cam1/", "cam2/x/"):
        b.list_multipart_uploads(prefix=prefix)
    for prefix in ("", "cam3/", "cam", "cam2/private/a"):
        assert isinstance(server_error(b.list_multipart_uploads, prefix=prefix), oss2.exceptions.AccessDenied), prefix
    with pytest.raises(Exception) as e:
        sts_credentials(policy={"Version": "1", "Statement": [
            {"Effect": "Allow", "Action": "oss:ListObjects", "Resource": "acs:oss:*:*:drop",
             "Condition": {"NumericLessThan": {"oss:MaxKeys": "10"}}}]})
    assert "InvalidParameter.PolicyGrammar" in str(e.value)
