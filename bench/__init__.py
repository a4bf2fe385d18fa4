"""Benchmarks: probe overhead and closed-form prediction at scale (not part of the tests)."""
