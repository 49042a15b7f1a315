"""Fixtures for the precompute / index / refresh / score tests (defined in jobs_fixtures.py)."""

from jobs_fixtures import catalog, other_checkpoint, tiny_checkpoint  # noqa: F401
