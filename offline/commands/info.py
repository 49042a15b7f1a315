"""`embsum info`: what the catalog holds (tables and counts, last runs, rejects by reason)."""

from __future__ import annotations

import json

import click
from embsum.offline.common import open_catalog


def _counts(raw: str | None, most: int = 8) -> str:
    counts = json.loads(raw or "{}")
    shown = [f"{k}={v}" for k, v in counts.items() if v][:most]
    return " ".join(shown) + (" ..." if len(counts) > most else "")


@click.command("info")
@click.option("--runs", "n_runs", type=click.IntRange(min=0), default=5, show_default=True,
              help="How many of the latest runs to list (0: all of them).")
@click.pass_context
def command(ctx: click.Context, n_runs: int) -> None:
    """Show the catalog's tables with row counts, the latest runs and the rejects by reason."""
    with open_catalog(ctx, read_only=True) as cat:
        click.echo(f"catalog {cat.path}")
        click.echo("tables:")
        for table in cat.tables():
            click.echo(f"  {table:<24} {cat.count(table):>12,}")
        total = cat.count("runs")
        runs = cat.arrow("SELECT run_id, kind, started_at, ended_at, status, counts, error FROM runs"
                         " ORDER BY started_at DESC LIMIT ?", [n_runs or total]).to_pylist()
        click.echo(f"last runs ({total} in all):" if runs else "runs: none yet")
        for r in runs:
            took = f"{(r['ended_at'] - r['started_at']).total_seconds():.1f}s" if r["ended_at"] else "-"
            click.echo(f"  {r['started_at']:%Y-%m-%d %H:%M:%S} {r['kind']:<10} {r['status']:<16} {took:>8}"
                       f"  {_counts(r['counts'])}")
            if r["error"] and r["status"] != "ok":  # why it failed, on its own line
                click.echo(f"      {r['error']}")
        rejects = cat.arrow("SELECT source, reason, count(*) AS n FROM rejects GROUP BY ALL"
                            " ORDER BY source, n DESC").to_pylist()
        click.echo("rejects by reason:" if rejects else "rejects: none")
        for r in rejects:
            click.echo(f"  {r['n']:>10,}  {r['reason']:<20} {r['source']}")
