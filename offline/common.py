"""Small pieces every command shares: opening the catalog, recording a run, progress bars."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import click

log = logging.getLogger("embsum")


def db_path(ctx: click.Context) -> str:
    return ctx.find_root().obj["db"]


def token_states_dir(ctx: click.Context) -> Path | None:
    """Where frozen-encoder jobs keep the catalog's encoder token states between runs
    (embsum/inference/state_store.py): EMBSUM_TOKEN_STATES (a directory, or 'off' for none), else
    beside the catalog, <db>.states/."""
    value = os.environ.get("EMBSUM_TOKEN_STATES", "").strip()
    if value.lower() == "off":
        return None
    return Path(value) if value else Path(f"{db_path(ctx)}.states")


def write_atomically(path: str | Path, write) -> Path:
    """`write(tmp)` into a temp file beside `path`, then rename it into place: a reader never sees
    half a file, and a failed write leaves neither a half file nor its temp behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def quiet(ctx: click.Context | None = None) -> bool:
    ctx = ctx or click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("quiet"))


def wait_s(ctx: click.Context) -> float:
    """The global --wait: how long to wait for a catalog another process is using."""
    return float((ctx.find_root().obj or {}).get("wait_s", 60.0))


@contextlib.contextmanager
def open_catalog(ctx: click.Context, read_only: bool = False, *, job: bool = True,
                 keep_open: bool = True) -> Iterator[Catalog]:  # noqa: F821
    """The catalog named by --db (a CatalogError is one line at the CLI's error boundary).

    Every open waits up to --wait while another process holds the file (a job's commit, a
    reader), then raises CatalogBusy (exit 75). A writer also takes the catalog's job lock under
    the command's name, waiting up to --wait for another writer job and naming it (see
    index/catalog.py); `job=False` for a few short writes that may slip between a running job's
    commits (run-ledger rows). `keep_open=False`: the job calls `cat.release()` while it computes."""
    from embsum.index.catalog import Catalog

    kind = (ctx.info_name or "job") if job and not read_only else None
    cat = Catalog(db_path(ctx), read_only=read_only, wait_s=wait_s(ctx), job=kind, keep_open=keep_open)
    try:
        yield cat
    finally:
        cat.close()


@contextlib.contextmanager
def recorded_run(ctx: click.Context, kind: str, args: dict) -> Iterator[RunRecord]:  # noqa: F821
    """A `runs` row for a job that does not hold the catalog while it works (train, evaluate):
    the catalog is opened briefly to start the row and again to end it, so readers and other
    jobs are not locked out meanwhile. Ends 'ok', 'failed' or 'interrupted' like `Catalog.run`."""
    from embsum.index.catalog import CatalogError, RunRecord, run_outcome

    if not os.path.exists(db_path(ctx)):  # a reading job: never create an empty catalog
        raise CatalogError(f"catalog {db_path(ctx)} does not exist (run `embsum ingest` first)")
    with open_catalog(ctx, job=False) as cat:  # ledger rows only: no job lock
        record = RunRecord(cat.start_run(kind, args), args)
    try:
        yield record
    except BaseException as err:
        status, error = run_outcome(err)
        with open_catalog(ctx, job=False) as cat:
            cat.finish_run(record.run_id, status, record.counts, error=error, args=record.args)
        raise
    with open_catalog(ctx, job=False) as cat:
        cat.finish_run(record.run_id, record.status, record.counts, error=record.error, args=record.args)


def progress_shown() -> bool:
    """Progress bars are off under --quiet or when EMBSUM_NO_PROGRESS is set (tests, CI logs)."""
    return not (quiet() or os.environ.get("EMBSUM_NO_PROGRESS"))


def progress(iterable: Iterable | None = None, **kwargs):
    """tqdm progress bar, silent where `progress_shown()` says so."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress_shown(), dynamic_ncols=True, **kwargs)


def step(message: str, *args) -> None:
    """Say what a job is doing before a slow step that draws no bar of its own (loading vectors,
    an index). Part of the progress display: shown and hidden with the bars."""
    if progress_shown():
        log.info(message, *args)
