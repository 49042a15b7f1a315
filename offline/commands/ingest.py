"""`embsum ingest`: items and interactions from files into the catalog (see offline/ingest/)."""

from __future__ import annotations

import click

from offline.common import open_catalog, progress
from offline.ingest.formats import FORMATS


@click.command("ingest")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="Input format; goodreads/mind/movielens take the dataset folder (or its files).")
@click.option("--kind", type=click.Choice(["auto", "items", "interactions"]), default="auto", show_default=True,
              help="What a tsv/csv/jsonl/parquet file holds (auto: a user column means interactions).")
@click.option("--id-col", help="Item id column (items; default: item_id, id, book_id, news_id, movie_id).")
@click.option("--title-col", help="Title column (default: title, name).")
@click.option("--description-col", "--text-col", "description_col",
              help="Description/text column (default: description, text, abstract, body).")
@click.option("--category-col", help="Category column (optional; default: category).")
@click.option("--user-col", help="User id column (interactions; default: user_id, user, uid).")
@click.option("--item-col", help="Item id column of an interaction (default: item_id, item, book_id, ...).")
@click.option("--time-col", help="Event time column: unix seconds or ISO 8601 (default: ts, time, timestamp).")
@click.option("--label-col", help="0/1 label column (default: label, clicked; none: implicit positive).")
@click.option("--max-reject-rate", type=click.FloatRange(0, 1), default=None,
              help="Exit non-zero when rejected / read rows exceeds this (good rows are kept).")
@click.option("--batch-size", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Records per batch; each batch is one transaction.")
@click.option("--quoting/--no-quoting", default=True, show_default=True,
              help="TSV/CSV: honour \"quoted\" fields; off splits on the delimiter only.")
@click.pass_context
def command(ctx: click.Context, paths: tuple[str, ...], fmt: str, kind: str, max_reject_rate: float | None,
            batch_size: int, quoting: bool, **columns) -> None:
    """Load items and interactions into the catalog (an upsert: re-ingesting is safe).

    \b
    Examples:
      embsum ingest ../shared/data/goodreads --format goodreads
      embsum ingest ../shared/data/mind-sample --format mind
      embsum ingest books.csv --kind items --id-col isbn --text-col blurb
      embsum ingest clicks.parquet --kind interactions --user-col uid --item-col isbn --time-col ts

    Bad rows (missing id, empty text, conflicting duplicate id, invalid UTF-8, wrong column
    count, interaction with an unknown item) go to the `rejects` table with their line and
    reason; the good rows go in. Exits non-zero only when nothing usable was read or the reject
    rate is over --max-reject-rate.
    """
    from offline.ingest.formats import Mapping
    from offline.ingest.job import IngestConfig, ingest
    from offline.ingest.records import FormatError

    config = IngestConfig(format=fmt, kind=kind, batch_size=batch_size, max_reject_rate=max_reject_rate,
                          quoting=quoting)
    with open_catalog(ctx) as cat:
        try:
            report = ingest(cat, list(paths), config, Mapping(**columns), progress=progress)
        except FormatError as err:
            raise click.ClickException(str(err)) from None
    for line in report.summary():
        click.echo(line)
    if report.status == "empty":
        raise click.ClickException("nothing usable was read (every row was rejected or the input is empty)")
    if report.status == "rejects_exceeded":
        raise click.ClickException(
            f"reject rate {report.reject_rate:.1%} is over --max-reject-rate {max_reject_rate:.1%} "
            f"(the {report.landed} good rows were kept; see `embsum info`)")
