"""What every link of the default chain (and the profile / oidc sources) takes from the
[credentials] section and the process: one frozen object, so the links read no config."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class LinkContext:
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    sts_endpoint: str = ""            # credentials.sts_endpoint when set explicitly, else ""
    session_name: str = "ossyncd"
    duration_seconds: int = 3600
    policy: str | None = None
    timeout: float = 10.0
    ecs_metadata_url: str = "http://100.100.100.200/latest/meta-data/ram/security-credentials/"
    ecs_timeout: float = 1.0          # the chain's metadata probe: one try, short

    def env(self, name: str) -> str:
        return (self.environ.get(name) or "").strip()

    def flag(self, name: str) -> bool:
        return self.env(name).lower() == "true"

    def home(self) -> Path:
        return Path(self.env("HOME") or os.path.expanduser("~"))

    def show(self, path: str | os.PathLike) -> str:
        """A path as messages show it: under HOME as ~/..."""
        p, home = str(path), str(self.home())
        return "~" + p[len(home):] if home not in ("", "/") and p.startswith(home.rstrip("/") + "/") else p
