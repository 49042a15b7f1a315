"""Small pieces every command shares: opening the catalog, progress bars, clean errors."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

import click

log = logging.getLogger("embsum")


def db_path(ctx: click.Context) -> str:
    return ctx.find_root().obj["db"]


def quiet(ctx: click.Context | None = None) -> bool:
    ctx = ctx or click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("quiet"))


@contextlib.contextmanager
def open_catalog(ctx: click.Context, read_only: bool = False) -> Iterator[Catalog]:  # noqa: F821
    """The catalog named by --db, with catalog errors turned into one clear line."""
    from index.catalog import Catalog, CatalogError

    try:
        cat = Catalog(db_path(ctx), read_only=read_only)
    except CatalogError as err:
        raise click.ClickException(str(err)) from None
    try:
        yield cat
    finally:
        cat.close()


def progress(iterable: Iterable | None = None, **kwargs):
    """tqdm progress bar, silent under --quiet or when EMBSUM_NO_PROGRESS is set (tests, CI logs)."""
    from tqdm.auto import tqdm

    disable = quiet() or bool(os.environ.get("EMBSUM_NO_PROGRESS"))
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)
