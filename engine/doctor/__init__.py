"""`corral doctor` and `corral-agent doctor`: one pass/warn/fail line per check, with the fix."""

from .checks import FAIL, PASS, WARN, Check, print_report

__all__ = ["FAIL", "PASS", "WARN", "Check", "print_report"]
