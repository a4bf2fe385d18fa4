"""Benchmarks: probe overhead, closed-form prediction at scale and per-rule accuracy
(bench/accuracy, bench/theory_accuracy.py); not part of the tests."""
