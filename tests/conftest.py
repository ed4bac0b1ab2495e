"""pytest hooks: the property tests' case counts in the terminal summary."""

from __future__ import annotations

import sys


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    strategies = sys.modules.get("strategies")
    if strategies is None or not strategies.CASES:
        return
    terminalreporter.section("property tests: cases run")
    for prop, n in sorted(strategies.CASES.items()):
        terminalreporter.write_line(f"{prop}: {n}")
    terminalreporter.write_line(f"total: {sum(strategies.CASES.values())}")
    for what, err in sorted(strategies.MAX_ERR.items()):
        terminalreporter.write_line(f"largest error, {what}: {err:.2e}")
