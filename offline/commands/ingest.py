"""`embsum ingest`: items and interactions from files into the catalog (see offline/ingest/)."""

from __future__ import annotations

import click
from embsum.offline.common import open_catalog, progress
from embsum.offline.ingest.formats import DEFAULT_POSITIVE_FROM, FORMATS


@click.command("ingest")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="Input format; goodreads/mind/movielens take the dataset folder (or its files).")
@click.option("--kind", type=click.Choice(["auto", "items", "interactions"]), default="auto", show_default=True,
              help="What a tsv/csv/jsonl/parquet file holds (auto: a user column means interactions).")
@click.option("--id-col", help="Item id column (items; default: item_id, id, book_id, news_id, movie_id, ...). "
                               "Default names match any case and _/-/space: userId = user_id.")
@click.option("--title-col", help="Title column (default: title, name).")
@click.option("--description-col", "--text-col", "description_col",
              help="Description/text column (default: description, text, abstract, body).")
@click.option("--category-col", help="Category column (optional; default: category).")
@click.option("--user-col", help="User id column (interactions; default: user_id, user, uid, ...).")
@click.option("--item-col", help="Item id column of an interaction (default: item_id, item, book_id, ...).")
@click.option("--time-col", help="Event time column: unix seconds or ISO 8601 (default: ts, time, timestamp).")
@click.option("--label-col", help="0/1 label column (default: label, clicked; none: every row a positive). "
                                  "Refused when it holds ratings: use --rating-col.")
@click.option("--rating-col", help="Rating column (default: rating, stars, when there is no label column); "
                                   "its labels come from --positive-from.")
@click.option("--positive-from", type=float, default=DEFAULT_POSITIVE_FROM, show_default=True,
              help="A rating >= this is a positive (label 1); below it an explicit dislike (label 0, kept).")
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
      embsum ingest ratings.csv --rating-col rating --positive-from 4

    Bad rows (missing id, empty text, conflicting duplicate id, invalid UTF-8, wrong column
    count, a field over 64 MiB, interaction with an unknown item, unparseable time, label or
    rating) go to the `rejects` table with their line and reason; the good rows go in. Exits
    non-zero only when nothing usable was read, the reject rate is over --max-reject-rate, or
    a file cannot be read as asked (a label column holding ratings: nothing is written).
    """
    from embsum.offline.ingest.formats import Mapping
    from embsum.offline.ingest.job import IngestConfig, ingest

    config = IngestConfig(format=fmt, kind=kind, batch_size=batch_size, max_reject_rate=max_reject_rate,
                          quoting=quoting)
    try:
        mapping = Mapping(**columns)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    with open_catalog(ctx) as cat:  # a FormatError is one line (exit 1) at the CLI's error boundary
        report = ingest(cat, list(paths), config, mapping, progress=progress)
    for line in report.summary():
        click.echo(line)
    if report.status == "empty":
        raise click.ClickException("nothing usable was read (every row was rejected or the input is empty)")
    if report.status == "rejects_exceeded":
        raise click.ClickException(
            f"reject rate {report.reject_rate:.1%} is over --max-reject-rate {max_reject_rate:.1%} "
            f"(the {report.landed} good rows were kept; see `embsum info`)")
