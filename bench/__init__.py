"""Benchmarks that print ratios against the field's own code path (docs/benchmarks.md)."""
