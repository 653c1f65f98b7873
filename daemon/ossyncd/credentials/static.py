"""The sources that need no network: ``env`` (OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET /
OSS_SESSION_TOKEN) and ``static`` (keys from the config file)."""

from __future__ import annotations

import os

from .base import Snapshot, SourceBase


class EnvSource(SourceBase):
    """OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET / OSS_SESSION_TOKEN, read at fetch time."""

    name = "env"
    ID_VAR, SECRET_VAR, TOKEN_VAR = "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN"

    def __init__(self, environ: dict | None = None):
        self._environ = os.environ if environ is None else environ

    def _secrets(self):
        return (self._environ.get(self.SECRET_VAR, ""), self._environ.get(self.TOKEN_VAR, ""))

    def fetch(self) -> Snapshot:
        """The variables as they are now. Permanent CredentialsError naming each one unset."""
        ak = self._environ.get(self.ID_VAR, "").strip()
        sk = self._environ.get(self.SECRET_VAR, "").strip()
        token = self._environ.get(self.TOKEN_VAR, "").strip()
        missing = [n for n, v in ((self.ID_VAR, ak), (self.SECRET_VAR, sk)) if not v]
        if missing:
            raise self._err(f"credentials.source = 'env' but {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not set in the daemon's environment; "
                            f"export {self.ID_VAR} and {self.SECRET_VAR} (and {self.TOKEN_VAR} for an STS token)",
                            transient=False, code="MissingEnv")
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

