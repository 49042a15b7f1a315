"""Whether a model name may be fetched from the Hugging Face hub.

Nightly jobs must never reach out to the network on their own: a name that is not a local
directory is looked up in the local Hugging Face cache only. Downloading is opt-in, with
`embsum --allow-download ...` or EMBSUM_ALLOW_DOWNLOAD=1, and HF_HUB_OFFLINE=1 always wins.
"""

from __future__ import annotations

import os

ALLOW_DOWNLOAD_ENV = "EMBSUM_ALLOW_DOWNLOAD"
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def downloads_allowed() -> bool:
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").lower() in _TRUE and not hub_offline()


def why_no_download() -> str:
    """The reason a name was looked up in the local cache only (for error messages)."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    return f"downloads are off; pass --allow-download or set {ALLOW_DOWNLOAD_ENV}=1 to fetch it"
