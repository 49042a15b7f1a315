"""The storage layer's root for errors a user causes and can fix (an unreadable catalog, a
missing or foreign index, a catalog busy with another job). The CLI (offline/errors.py) prints
them as one line; see embsum/errors.py for why the two layers do not share one class."""

from __future__ import annotations


class StorageError(Exception):
    """Something the user can fix; `str(err)` is the whole message, one line."""


class CatalogBusy(StorageError):
    """Another process holds the catalog's write lock longer than this job was told to wait."""
