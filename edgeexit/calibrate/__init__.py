"""Latency profiling, exit statistics and budget-optimal threshold selection."""
