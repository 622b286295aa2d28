"""Report what the robustness suite tried: the counters the modules keep."""

from __future__ import annotations

import sys


def pytest_terminal_summary(terminalreporter) -> None:
    for name in ("test_fuzz_spec", "test_faults"):
        module = sys.modules.get(name) or sys.modules.get(f"tests.robustness.{name}")
        counts = getattr(module, "COUNTS", None)
        if counts:
            total = sum(counts.values())
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
            terminalreporter.write_line(f"{name}: {total} cases ({detail})")
