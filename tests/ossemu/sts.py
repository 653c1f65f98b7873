"""STS AssumeRole (RPC style, HMAC-SHA1 signature), as aliyun-python-sdk-sts sends it.

Error codes (JSON `{"RequestId","HostId","Code","Message","Recommend"}`):
  404 InvalidAccessKeyId.NotFound      unknown AccessKeyId
  400 SignatureDoesNotMatch            "...server string to sign is:<STS>" (the SDK splits on ':')
  400 InvalidTimeStamp.Format          Timestamp not ISO 8601 UTC (YYYY-MM-DDThh:mm:ss[.fff]Z)
  400 InvalidTimeStamp.Expired         Timestamp more than 15 minutes off
  400 SignatureNonceUsed               replayed SignatureNonce
  400 Missing<Param>                   a required parameter is absent
  400 InvalidParameter.RoleArn         RoleArn not of the form acs:ram::<digits>:role/<name>
  404 EntityNotExist.Role              well-formed RoleArn other than the emulator's roles
  403 NoPermission                     caller is not allowed to assume the role (STS credentials,
                                       except a `relay` role session assuming `uploader`: role chaining)
  403 InvalidSecurityToken.Expired     STS caller whose SecurityToken is unknown or expired
  400 InvalidParameter.RoleSessionName / .DurationSeconds / .PolicyGrammar

AssumeRoleWithOIDC (anonymous: no AccessKeyId, no Signature; RRSA), checked against the
TestIssuer the emulator trusts (oidc.py):
  400 Missing<Param>                               RoleArn, OIDCProviderArn, OIDCToken, RoleSessionName
  404 EntityNotExist.OIDCProvider                  OIDCProviderArn other than the trusted provider's
  400 AuthenticationFail.OIDCToken.Invalid         not a JWT, bad signature, no sub
  400 AuthenticationFail.OIDCToken.IssuerInvalid   iss is not the provider's issuer URL
  400 AuthenticationFail.OIDCToken.AudienceInvalid aud does not hold sts.aliyuncs.com
  400 AuthenticationFail.OIDCToken.Expired         exp has passed
"""

import base64
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import quote

from . import oidc
from .auth import SKEW_SECONDS, Principal, parse_policy
from .errors import StsError

SESSION_NAME_RE = re.compile(r"^[A-Za-z0-9.@_-]{2,64}$")
ROLE_ARN_RE = re.compile(r"^acs:ram::\d+:role/[A-Za-z0-9.@_-]+$")
# ISO 8601 UTC, fractions optional: aliyunsdkcore sends whole seconds, ali-oss sends
# new Date().toISOString() (milliseconds); STS accepts both.
TIMESTAMP_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z$")
MAX_DURATION = 3600


def _enc(s):
    return quote(s, safe="-_.~")


def string_to_sign(method, params):
    pairs = sorted((k, v) for k, v in params.items() if k != "Signature")
    canon = "&".join(f"{_enc(k)}={_enc(v)}" for k, v in pairs)
    return f"{method}&%2F&{_enc(canon)}"


def sign(secret, sts):
    return base64.b64encode(hmac.new((secret + "&").encode(), sts.encode(), hashlib.sha1).digest()).decode()


def parse_timestamp(value):
    """The RPC Timestamp as epoch seconds, or None when it is not ISO 8601 UTC."""
    m = TIMESTAMP_RE.match(value)
    if m is None:
        return None
    try:
        whole = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:   # e.g. month 13
        return None
    return whole.timestamp() + float("0." + (m.group(2) or "0"))


class AssumeRole:
    def __init__(self, authority, min_duration=900, clock=time.time, issuer=None):
        self.authority = authority
        self.issuer = issuer    # oidc.TestIssuer trusted by AssumeRoleWithOIDC
        self.min_duration = min_duration
        self.clock = clock
        self._nonces = {}
        self._lock = threading.Lock()

    def _require(self, params, name):
        v = params.get(name)
        if v is None or v == "" and name != "SignatureType":
            raise StsError(400, f"Missing{name}", f"{name} is mandatory for this action.")
        return v

    def _nonce_seen(self, nonce, now):
        with self._lock:
            for n, t in list(self._nonces.items()):
                if t < now - 2 * SKEW_SECONDS:
                    del self._nonces[n]
            if nonce in self._nonces:
                return True
            self._nonces[nonce] = now
            return False

    def handle(self, method, params):
        """params: merged query + form parameters (decoded). Returns the success dict."""
        for name in ("AccessKeyId", "Signature", "SignatureNonce", "Timestamp"):
            self._require(params, name)
        if params.get("Action") != "AssumeRole":
            raise StsError(404, "InvalidAction.NotFound", "Specified api is not found, please check your url and method.")
        if params.get("Version") != "2015-04-01":
            raise StsError(400, "InvalidVersion", "Specified parameter Version is not valid.")
        if params.get("SignatureMethod", "HMAC-SHA1") != "HMAC-SHA1":
            raise StsError(400, "InvalidSignatureMethod", "Specified signature method is not supported.")
        ak = params["AccessKeyId"]
        principal = self.authority.static.get(ak)
        if principal is None and ak.startswith("STS.") and params.get("SecurityToken"):
            session = self.authority.session(ak, params["SecurityToken"])
            if session is None:
                raise StsError(403, "InvalidSecurityToken.Expired", "Specified SecurityToken is expired.")
            principal = Principal("sts", session.access_key_id, session.secret, session)
        if principal is None:
            raise StsError(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        now = self.clock()
        ts = parse_timestamp(params["Timestamp"])
        if ts is None:
            raise StsError(400, "InvalidTimeStamp.Format", "Specified time stamp or date value is not well formatted.")
        if abs(ts - now) > SKEW_SECONDS:
            raise StsError(400, "InvalidTimeStamp.Expired", "Specified time stamp or date value is expired.")
        sts = string_to_sign(method, params)
        if not hmac.compare_digest(sign(principal.secret, sts), params["Signature"]):
            raise StsError(400, "SignatureDoesNotMatch",
                           "Specified signature is not matched with our calculation. server string to sign is:" + sts)
        if self._nonce_seen(params["SignatureNonce"], now):
            raise StsError(400, "SignatureNonceUsed", "Specified signature nonce was used already.")

        arn = self._require(params, "RoleArn")
        if not ROLE_ARN_RE.match(arn):
            raise StsError(400, "InvalidParameter.RoleArn", "The parameter RoleArn is wrongly formed.")
        if arn not in self.authority.roles:
            raise StsError(404, "EntityNotExist.Role", f"The role not exists: {arn}.")
        chained = (principal.kind == "sts" and arn == self.authority.role_arn
                   and getattr(principal.session, "caller", None) == "relay")
        if principal.kind not in ("user", "root") and not chained:
            raise StsError(403, "NoPermission", "You are not authorized to do this action. "
                                                "You should be authorized by RAM.")
        return self._issue("relay" if arn == self.authority.relay_role_arn else principal.kind, arn, params)

    def handle_oidc(self, params):
        """AssumeRoleWithOIDC: (the success dict, the accepted token's jti)."""
        if params.get("Version") != "2015-04-01":
            raise StsError(400, "InvalidVersion", "Specified parameter Version is not valid.")
        for name in ("RoleArn", "OIDCProviderArn", "OIDCToken"):
            self._require(params, name)
        if self.issuer is None or params["OIDCProviderArn"] != self.issuer.provider_arn:
            raise StsError(404, "EntityNotExist.OIDCProvider",
                           f"The OIDC provider not exists: {params['OIDCProviderArn']}.")
        arn = params["RoleArn"]
        if not ROLE_ARN_RE.match(arn):
            raise StsError(400, "InvalidParameter.RoleArn", "The parameter RoleArn is wrongly formed.")
        claims = oidc.verify(params["OIDCToken"], self.issuer, clock=self.clock)
        if arn != self.authority.role_arn:
            raise StsError(404, "EntityNotExist.Role", f"The role not exists: {arn}.")
        return self._issue("oidc", arn, params), claims.get("jti", "")

    def _issue(self, caller, arn, params):
        name = self._require(params, "RoleSessionName")
        if not SESSION_NAME_RE.match(name):
            raise StsError(400, "InvalidParameter.RoleSessionName", "The parameter RoleSessionName is wrongly formed.")
        raw = params.get("DurationSeconds") or "3600"
        try:
            duration = int(raw)
        except ValueError:
            duration = -1
        if not self.min_duration <= duration <= MAX_DURATION:
            raise StsError(400, "InvalidParameter.DurationSeconds",
                           f"The Min/Max value of DurationSeconds is {self.min_duration}s/{MAX_DURATION}s.")
        policy = None
        if params.get("Policy") is not None:
            text = params["Policy"]
            try:
                if not 1 <= len(text) <= 2048:
                    raise ValueError("length")
                policy = parse_policy(text)
            except ValueError:
                raise StsError(400, "InvalidParameter.PolicyGrammar",
                               "The parameter Policy has not passed grammar check.")

        s = self.authority.issue(caller, name, duration, policy, role_policy=self.authority.roles[arn])
        role_id = "3" + str(int(hashlib.sha1(arn.encode()).hexdigest(), 16) % 10 ** 17).zfill(17)
        return {
            "RequestId": str(uuid.uuid4()).upper(),
            "AssumedRoleUser": {"Arn": f"{arn}/{name}", "AssumedRoleId": f"{role_id}:{name}"},
            "Credentials": {
                "AccessKeyId": s.access_key_id,
                "AccessKeySecret": s.secret,
                "SecurityToken": s.token,
                # rounded down: a client never believes a token lives longer than it does
                "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(s.expires_at))),
            },
        }


def error_json(err, request_id):
    return json.dumps({"RequestId": request_id, "HostId": "sts.aliyuncs.com", "Code": err.code,
                       "Message": err.message,
                       "Recommend": f"https://api.aliyun.com/troubleshoot?q={err.code}&product=Sts"}).encode()
