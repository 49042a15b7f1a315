"""The model layer's root for errors a user causes and can fix (a bad config value, a missing or
damaged checkpoint, an unusable backbone). The CLI (offline/errors.py) prints them as one line
with exit code 1; anything else is a bug and gets a traceback under -v.

The storage layer has its own root (index/errors.py): embsum/ and index/ never import each
other, so the one place that knows both is the CLI's error boundary.
"""

from __future__ import annotations


class EmbsumError(Exception):
    """Something the user can fix; `str(err)` is the whole message, one line."""
