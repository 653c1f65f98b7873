"""Shared pytest fixtures."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# requests (oss2) and aliyunsdkcore honour proxy variables; never proxy the local emulator.
for _var in ("NO_PROXY", "no_proxy"):
    _cur = [h for h in os.environ.get(_var, "").split(",") if h]
    os.environ[_var] = ",".join(dict.fromkeys(["127.0.0.1", "localhost"] + _cur))


# ---------------------------------------------------------------- OSS + STS emulator
@pytest.fixture
def emulator(tmp_path):
    """A fresh emulator (bucket `drop`, min_duration=1) on a temp data dir."""
    from tests.ossemu import Emulator

    emu = Emulator(str(tmp_path / "ossemu-data"), buckets=["drop"], min_duration=1)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def root_bucket(emulator):
    """oss2.Bucket on `drop` with the emulator's root key (V1)."""
    import oss2

    return oss2.Bucket(oss2.Auth(emulator.root.id, emulator.root.secret), emulator.oss_url, "drop")


@pytest.fixture
def sts_credentials(emulator):
    """Callable doing a real AssumeRole with aliyun-python-sdk-sts and the `user` key.

    sts_credentials(duration=3600, session_name="pytest", policy=None, key_id=None, secret=None,
                    role_arn=None) -> {"AccessKeyId", "AccessKeySecret", "SecurityToken", "Expiration"}
    """
    from aliyunsdkcore.client import AcsClient
    from aliyunsdksts.request.v20150401.AssumeRoleRequest import AssumeRoleRequest

    def assume(duration=3600, session_name="pytest", policy=None, key_id=None, secret=None, role_arn=None):
        client = AcsClient(key_id or emulator.user.id, secret or emulator.user.secret, emulator.region,
                           timeout=10, connect_timeout=5)
        req = AssumeRoleRequest()
        req.set_endpoint(emulator.sts_url)          # scheme prefix overrides the forced https
        req.set_RoleArn(role_arn or emulator.role_arn)
        req.set_RoleSessionName(session_name)
        req.set_DurationSeconds(duration)
        if policy is not None:
            req.set_Policy(policy if isinstance(policy, str) else json.dumps(policy))
        return json.loads(client.do_action_with_exception(req))["Credentials"]

    return assume


# ---------------------------------------------------------------- ossyncd as nobody
@pytest.fixture(scope="session")
def _unprivileged_env():
    from tests import unprivileged

    try:
        u = unprivileged.build()
    except unprivileged.Unavailable as e:
        u = e
    yield u
    if isinstance(u, unprivileged.Unprivileged):
        shutil.rmtree(u.base, ignore_errors=True)


@pytest.fixture
def unprivileged(_unprivileged_env):
    """tests.unprivileged.Unprivileged: `cmd(*args)` runs a python with ossyncd as nobody, `env()`,
    `workdir()` a fresh folder nobody can write. Built once per session under /tmp; skips, with
    the reason, only where that is impossible (not root, no setpriv, no interpreter nobody can run)."""
    from tests import unprivileged as up

    if isinstance(_unprivileged_env, up.Unavailable):
        pytest.skip(f"cannot run as nobody: {_unprivileged_env}")
    return _unprivileged_env


# ---------------------------------------------------------------- ossyncd run as a subprocess
@pytest.fixture
def daemon_factory(tmp_path, request):
    """make(watches, emu=None, **sections) -> tests.helpers.Daemon against `emu` (default: the
    `emulator` fixture's); every daemon is killed at teardown."""
    from tests.helpers import Daemon, fast_upload

    made = []

    def make(watches, *, emu=None, **sections):
        sections.setdefault("upload", fast_upload())
        sections.setdefault("daemon", {"rescan_interval": 5.0})
        d = Daemon(tmp_path, emu or request.getfixturevalue("emulator"), watches, **sections)
        made.append(d)
        return d
    yield make
    for d in made:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


# ---------------------------------------------------------------- big trees
@pytest.fixture
def big_dir(tmp_path):
    """A fresh folder for a big tree, on tmpfs when there is one (removed afterwards)."""
    # Creating 100k files is disk-bound (and slow when the disk is shared);
    # the scan's own cost is what this measures, so prefer tmpfs for setup.
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="ossyncd-bigtree-", dir="/dev/shm"))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path
