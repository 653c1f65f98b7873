"""Run ossyncd as `nobody` (uid 65534): root reads every file, so unreadable-file tests need
another user.

The checkout may sit where nobody cannot enter (root's home, a `mktemp -d`), and so may the
interpreter. So once per session this builds a world-reachable directory under /tmp holding
what nobody needs: a venv of an interpreter nobody can run, with this checkout's installed
dependencies and the ossyncd package in it. Tests put their data in fresh folders under it.
Nothing outside that directory has its permissions changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import ossyncd

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


class Unavailable(Exception):
    """Why the unprivileged runs cannot be set up here (the tests skip with this reason)."""


class Unprivileged:
    def __init__(self, base: Path, python: str):
        self.base = base
        self.python = python
        self._n = 0

    def cmd(self, *args) -> list[str]:
        """argv running this venv's python as nobody."""
        return [*SETPRIV, self.python, *map(str, args)]

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        return {**env, "HOME": "/", **extra}

    def workdir(self) -> Path:
        """A fresh folder nobody may write (mode 0777, inside our own directory)."""
        self._n += 1
        d = self.base / "work" / str(self._n)
        d.mkdir(parents=True)
        os.chmod(d, 0o777)
        return d


def _nobody_can_run(python: str) -> bool:
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    try:
        r = subprocess.run([*SETPRIV, python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True, timeout=30, cwd="/")
    except OSError:
        return False
    return r.returncode == 0 and r.stdout.strip() == want


def _interpreter() -> str:
    """The first interpreter of this Python version that nobody can run (the copied packages
    may hold compiled extensions for it)."""
    ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [os.path.realpath(p) for p in (getattr(sys, "_base_executable", ""), sys.executable) if p]
    candidates += [os.path.join(d, ver) for d in ("/usr/local/bin", "/usr/bin", "/bin")]
    for c in dict.fromkeys(candidates):
        if os.path.isfile(c) and _nobody_can_run(c):
            return c
    raise Unavailable(f"no {ver} interpreter that uid {NOBODY} can run (tried {', '.join(dict.fromkeys(candidates))}); "
                      f"install {ver} where every user can reach it, e.g. /usr/bin")


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link what nobody may already read (cheap, shares no mode change); copy the rest
    and make the copy readable."""
    mode = os.stat(src).st_mode
    if mode & 0o004 and (not mode & 0o100 or mode & 0o001):
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system
            pass
    shutil.copy2(src, dst)
    os.chmod(dst, mode | 0o444 | (0o111 if mode & 0o100 else 0))


def _copy_tree(src: Path, dst: Path, ignore) -> None:
    shutil.copytree(src, dst, ignore=ignore, copy_function=_link_or_copy, dirs_exist_ok=True)
    for d, _, _ in os.walk(dst):
        os.chmod(d, 0o755)     # our own new folders, whatever the source's modes


def build() -> Unprivileged:
    if os.geteuid() != 0:
        raise Unavailable("needs root, to run ossyncd as nobody through setpriv")
    if shutil.which("setpriv") is None:
        raise Unavailable("setpriv (util-linux) is not installed")
    python = _interpreter()
    base = Path(tempfile.mkdtemp(prefix="ossyncd-nobody-", dir="/tmp"))   # /tmp: every user may enter
    try:
        os.chmod(base, 0o755)
        venv = base / "venv"
        subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True,
                       timeout=120)
        site = subprocess.run([str(venv / "bin" / "python"), "-c",
                               "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True, timeout=60).stdout.strip()
        # this checkout's dependencies as installed, without its editable hook into the checkout
        _copy_tree(Path(sysconfig.get_paths()["purelib"]), Path(site),
                   shutil.ignore_patterns("__editable__*", "ossyncd", "ossyncd-*"))
        _copy_tree(Path(ossyncd.__file__).parent, Path(site) / "ossyncd", shutil.ignore_patterns("__pycache__"))
        subprocess.run([str(venv / "bin" / "python"), "-m", "compileall", "-q", str(Path(site) / "ossyncd")],
                       check=True, capture_output=True, timeout=120)
        for d, _, _ in os.walk(base):
            os.chmod(d, 0o755)
        u = Unprivileged(base, str(venv / "bin" / "python"))
        r = subprocess.run(u.cmd("-c", "import ossyncd.cli, ossyncd.app"), capture_output=True, text=True,
                           timeout=60, cwd="/", env=u.env())
        if r.returncode != 0:
            raise RuntimeError(f"the venv built for nobody in {base} cannot import ossyncd:\n{r.stderr}")
        return u
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
