"""Benchmark runners shared by ``fastpurify bench`` and the pytest-benchmark suites in bench/."""
