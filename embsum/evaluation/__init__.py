"""Metrics, the leave-last-out protocol (goodreads-v1), paired bootstrap intervals."""
