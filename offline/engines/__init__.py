"""Engines that run `embsum precompute` and `embsum score`: `local` (this process, the jobs in
offline/precompute.py and offline/scoring.py) and `ray` (offline/engines/ray_engine.py: a Ray
Data actor pool calling the same encoder and ranker). Ray is an optional extra, imported only
when `--engine ray` is used, so `embsum --help` and the local engine never load it."""

from __future__ import annotations

from embsum.offline.errors import UserError

RAY_EXTRA = "pip install 'embsum[ray]'"


class EngineUnavailable(UserError):
    """The engine asked for is not installed (one line naming the extra)."""


def load_ray():
    """The Ray engine module; a missing `ray` is one line naming the extra to install."""
    try:
        import ray.data  # noqa: F401
    except ImportError as err:
        raise EngineUnavailable(f"--engine ray needs Ray Data ({err.name or 'ray'} is not installed): "
                                f"{RAY_EXTRA}") from None
    from embsum.offline.engines import ray_engine as module

    return module
