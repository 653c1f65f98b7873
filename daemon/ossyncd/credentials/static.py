"""The sources that need no network: ``env`` (the ALIBABA_CLOUD_* or OSS_* key variables) and
``static`` (keys from the config file, or a profile)."""

from __future__ import annotations

import os

from .base import Snapshot, SourceBase


class EnvSource(SourceBase):
    """ALIBABA_CLOUD_ACCESS_KEY_ID / _SECRET / ALIBABA_CLOUD_SECURITY_TOKEN, else the OSS SDK's
    OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET / OSS_SESSION_TOKEN, read at fetch time."""

    name = "env"
    FAMILIES = (("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_SECURITY_TOKEN"),
                ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN"))
    ID_VAR, SECRET_VAR, TOKEN_VAR = FAMILIES[1]

    def __init__(self, environ: dict | None = None):
        self._environ = os.environ if environ is None else environ

    def _secrets(self):
        return tuple(self._environ.get(v, "") for fam in self.FAMILIES for v in fam[1:])

    def family(self) -> tuple[str, str, str] | None:
        """The first variable family whose id variable is set (the chain's env link)."""
        for fam in self.FAMILIES:
            if self._environ.get(fam[0], "").strip():
                return fam
        return None

    def link_description(self) -> str:
        """The chain's name for this link (an explicit `env` source keeps the label "env")."""
        fam = self.family()
        return f"environment {fam[0]}" if fam else "environment"

    def fetch(self) -> Snapshot:
        """The variables as they are now. Permanent CredentialsError naming each one unset."""
        fam = self.family() or self.FAMILIES[1]
        id_var, secret_var, token_var = fam
        ak = self._environ.get(id_var, "").strip()
        sk = self._environ.get(secret_var, "").strip()
        token = self._environ.get(token_var, "").strip()
        missing = [n for n, v in ((id_var, ak), (secret_var, sk)) if not v]
        if missing:
            raise self._err(f"credentials.source = 'env' but {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not set in the process's environment; "
                            f"export {id_var} and {secret_var} (and {token_var} for an STS token), or the "
                            f"ALIBABA_CLOUD_* equivalents", transient=False, code="MissingEnv")
        return Snapshot(ak, sk, token or None, None)


class StaticSource(SourceBase):
    """Keys from the config file; never expire."""

    name = "static"

    def __init__(self, *, access_key_id: str, access_key_secret: str, security_token: str = ""):
        """Both keys set (config.CredentialsConfig requires them with source = "static")."""
        self._snap = Snapshot(access_key_id, access_key_secret, security_token or None, None)

    def fetch(self) -> Snapshot:
        """The configured keys; never fails."""
        return self._snap

