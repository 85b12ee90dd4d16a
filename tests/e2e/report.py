"""Benchmark figures the end-to-end run prints at the end (measurements, not asserts)."""

LINES: list[str] = []
