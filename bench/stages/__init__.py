"""Stages of a sweep run: fit (Ray Train), trace (Ray Data actors), score (in process)."""
