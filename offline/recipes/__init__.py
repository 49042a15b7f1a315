"""Packaged training recipes (TOML, one [train] table like `embsum --config FILE`).

`embsum train --recipe goodreads_cpu` takes every option the command line does not set from
the recipe; `load_recipe` also serves the benchmarks.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from embsum.offline.errors import UserError


class RecipeError(UserError, ValueError):
    pass


def available() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))


def recipe_path(name: str) -> Path:
    """A packaged recipe name (`goodreads_cpu`) or a path to a TOML file."""
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return path
    packaged = resources.files(__name__) / f"{name}.toml"
    if packaged.is_file():
        return Path(str(packaged))
    raise RecipeError(f"unknown recipe {name!r} (packaged: {', '.join(available())}; or a .toml path)")


def load_recipe(name: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(recipe_path(name), "rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise RecipeError(f"recipe {name}: invalid TOML: {err}") from None
