"""STS rotations and outages, OSS down, SIGSTOP (make chaos)."""

import pytest

from tests.chaos import report, scenarios

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]


def test_30_sts_rotations_during_uploads(tmp_path, emulator, daemon_factory):
    f = scenarios.rotations(tmp_path, daemon_factory, emulator, target=30, deadline=300)
    report.record("STS rotations (3 s tokens + forced expiry)", **f)
    assert f["rotations"] >= 30


def test_sts_down_2_minutes_with_5_second_tokens(tmp_path, emulator, daemon_factory):
    f = scenarios.sts_down(tmp_path, daemon_factory, emulator, down=120)
    report.record("STS down 2 min (5 s tokens)", **f)


def test_oss_down_5_minutes(tmp_path, emulator, daemon_factory):
    f = scenarios.oss_down(tmp_path, daemon_factory, emulator, down=300)
    report.record("OSS down 5 min (503, then refused)", **f)


def test_sigstop_past_the_token_life(tmp_path, emulator, daemon_factory):
    f = scenarios.sigstop(tmp_path, daemon_factory, emulator, stopped=10)
    report.record("SIGSTOP 10 s (3 s tokens), SIGCONT", **f)
