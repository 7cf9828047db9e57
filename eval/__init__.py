"""Benchmark datasets, metrics, the k-shot runner and reports."""
