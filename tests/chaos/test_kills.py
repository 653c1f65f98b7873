"""kill -9 at 200 random moments and 5 times at each crash point (make chaos)."""

import pytest

from tests.chaos import report, scenarios
from tests.helpers import MiB

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1300)]


def test_kill_9_at_230_moments(tmp_path, daemon_factory):
    f = scenarios.kills(tmp_path, daemon_factory, random_kills=200, per_point=5, max_size=64 * MiB, deadline=1080)
    report.record("kill -9 (200 random + 30 at crash points)", **f)
    assert f["kills"] >= 200
