"""Shared pieces of the reliability suite (tests/test_reliability.py, tests/bench/reliability_*)."""
