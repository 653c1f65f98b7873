"""The chaos suite's report file and the table printed at the end of `make chaos`."""

import os

import pytest

from tests.chaos import report


@pytest.fixture(scope="session", autouse=True)
def _chaos_report(tmp_path_factory):
    if not os.environ.get(report.ENV):
        os.environ[report.ENV] = str(tmp_path_factory.getbasetemp() / "chaos-report.jsonl")
    yield


def pytest_terminal_summary(terminalreporter):
    if not os.environ.get(report.ENV):
        return
    rows = report.rows()
    if rows:
        terminalreporter.section("chaos summary")
        terminalreporter.write_line(f"report: {report.path()}")
        terminalreporter.write_line(report.table(rows))
