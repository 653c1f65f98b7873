"""At least 10,000 injected OSS faults of every kind under the mixed workload (make chaos)."""

import pytest

from tests.chaos import report, scenarios

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]


def test_10000_faults(tmp_path, emulator, daemon_factory):
    f = scenarios.faults(tmp_path, daemon_factory, emulator, target=10_000, per_round=40, deadline=600)
    report.record("injected OSS faults", **f)
    assert f["faults"] >= 10_000
