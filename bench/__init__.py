"""Benchmarks for STIP (not part of the installed package)."""
