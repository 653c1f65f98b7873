"""A test OIDC issuer (the role of an ACK cluster's RRSA provider) and the JWT checks STS
makes in AssumeRoleWithOIDC. ES256 via PyJWT + cryptography."""

import time
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from .auth import ACCOUNT_ID
from .errors import StsError

AUDIENCE = "sts.aliyuncs.com"


class TestIssuer:
    """Signs service-account tokens; the emulator trusts its public key.

    >>> iss = TestIssuer(); iss.token(ttl=3)   # a JWT for system:serviceaccount:default:ossyncd
    """

    __test__ = False   # not a pytest class

    def __init__(self, issuer="https://oidc-ack-cn-hangzhou.oss-cn-hangzhou.aliyuncs.com/ossemu",
                 provider_arn=f"acs:ram::{ACCOUNT_ID}:oidc-provider/ack-rrsa-ossemu", key=None):
        self.issuer = issuer
        self.provider_arn = provider_arn
        self._key = key or ec.generate_private_key(ec.SECP256R1())
        self.public_key = self._key.public_key()

    def token(self, sub="system:serviceaccount:default:ossyncd", ttl=3600, aud=AUDIENCE, iss=None,
              key=None, exp=None):
        now = int(time.time())
        claims = {"iss": iss or self.issuer, "aud": aud, "sub": sub, "iat": now,
                  "exp": exp if exp is not None else now + ttl, "jti": uuid.uuid4().hex}
        return jwt.encode(claims, key or self._key, algorithm="ES256")


def verify(token, issuer, clock=time.time):
    """The token's claims, or StsError with the code STS answers (docs/wire-protocol.md)."""
    try:
        jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise StsError(400, "AuthenticationFail.OIDCToken.Invalid", "The OIDC token is not a valid JWT.")
    if claims.get("iss") != issuer.issuer:
        raise StsError(400, "AuthenticationFail.OIDCToken.IssuerInvalid",
                       "The issuer of the OIDC token does not match the OIDC provider.")
    try:
        jwt.decode(token, issuer.public_key, algorithms=["ES256", "RS256"],
                   options={"verify_exp": False, "verify_aud": False, "verify_iss": False})
    except jwt.PyJWTError:
        raise StsError(400, "AuthenticationFail.OIDCToken.Invalid", "The signature of the OIDC token is invalid.")
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else [aud]
    if AUDIENCE not in auds:
        raise StsError(400, "AuthenticationFail.OIDCToken.AudienceInvalid",
                       f"The audience of the OIDC token must be {AUDIENCE}.")
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise StsError(400, "AuthenticationFail.OIDCToken.Invalid", "The OIDC token has no subject.")
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or exp <= clock():
        raise StsError(400, "AuthenticationFail.OIDCToken.Expired", "The OIDC token has expired.")
    return claims
