"""`embsum evaluate`: checkpoint + scores file + baselines in one report; popularity on the
real Goodreads catalog lands on the reference figure."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from jobs_fixtures import build_catalog, tiny_checkpoint  # noqa: F401

from offline.cli import cli


@pytest.fixture(scope="module")
def catalog_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("eval") / "cat.duckdb"
    build_catalog(db, n_items=60, n_users=150)
    return db


def _test_users(db):
    from embsum.evaluation import build_eval_set
    from index.catalog import Catalog

    with Catalog(db, read_only=True) as cat:
        histories, items = cat.histories(), cat.items().column("item_id").to_pylist()
    return build_eval_set(histories, items, "test"), items


def test_checkpoint_scores_file_and_baselines_in_one_report(tmp_path, catalog_db, tiny_checkpoint):  # noqa: F811
    es, items = _test_users(catalog_db)
    assert es.users
    oracle = tmp_path / "oracle.csv"  # candidates only: impressions judged, full ranking not
    lines = ["user,item,score"] + [f"{u.user_id},{i},{float(i == u.target)}" for u in es.users for i in set(u.uniform + u.pop)]
    oracle.write_text("\n".join(lines) + "\n")
    report = tmp_path / "out" / "report.json"
    result = CliRunner().invoke(cli, ["--db", str(catalog_db), "evaluate", "--checkpoint", str(tiny_checkpoint),
                                      "--scores", str(oracle), "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["protocol"] == "goodreads-v1" and data["evaluated_users"] == len(es.users)
    assert data["split_sizes"]["test"] >= len(es.users) and data["wall_time_s"] >= 0
    rows = {r["name"].split(" ")[0]: r for r in data["models"]}
    assert {"embsum", "scores", "random", "popularity", "zero-shot"} <= set(rows)
    assert len(rows["embsum"]["hash"]) == 16
    oracle_row = rows["scores"]
    assert oracle_row["coverage"] == 1.0 and oracle_row["metrics"]["full"] is None
    assert oracle_row["metrics"]["uniform"]["ndcg@10"] == 1.0 and oracle_row["metrics"]["pop"]["auc"] == 1.0
    assert 0 <= rows["embsum"]["metrics"]["full"]["recall@100"] <= 1
    table = report.with_suffix(".md").read_text()
    assert table in result.output and "| popularity |" in table


def test_scores_file_errors_are_one_line(tmp_path, catalog_db):
    bad = tmp_path / "bad.csv"
    bad.write_text("u,i,s\n1,2,3\n")
    result = CliRunner().invoke(cli, ["--db", str(catalog_db), "evaluate", "--scores", str(bad), "--no-baselines",
                                      "--report", str(tmp_path / "r.json")])
    assert result.exit_code != 0 and "needs columns user, item, score" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_real_goodreads_popularity_matches_reference(goodreads_dir, tmp_path):
    db = tmp_path / "gr.duckdb"
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", str(db), "-q", "ingest", "--format", "goodreads", str(goodreads_dir)]).exit_code == 0
    report = tmp_path / "r.json"
    result = runner.invoke(cli, ["--db", str(db), "evaluate", "--no-zero-shot", "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["evaluated_users"] == 2249
    assert data["split_sizes"]["train"] + data["split_sizes"]["dev"] + data["split_sizes"]["test"] == 23089
    pop = next(r for r in data["models"] if r["name"] == "popularity")["metrics"]
    assert pop["uniform"]["ndcg@10"] == pytest.approx(0.344, abs=0.001)  # independent implementation: 0.344
    assert pop["uniform"]["auc"] == pytest.approx(0.77, abs=0.01)
    rnd = next(r for r in data["models"] if r["name"] == "random")["metrics"]
    assert rnd["uniform"]["auc"] == pytest.approx(0.5, abs=0.02)


def test_read_scores_file_parquet_and_tsv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from offline.evaluate import read_scores_file

    pq.write_table(pa.table({"user_id": ["u1", "u1"], "item_id": ["7", "8"], "score": [0.5, 1.0]}), tmp_path / "s.parquet")
    assert read_scores_file(tmp_path / "s.parquet") == {"u1": {"7": 0.5, "8": 1.0}}
    (tmp_path / "s.tsv").write_text("user\titem\tscore\nu2\t007\t2\n")
    assert read_scores_file(tmp_path / "s.tsv") == {"u2": {"007": 2.0}}  # ids stay strings
