"""`embsum evaluate`: checkpoint + scores file + baselines in one report with paired bootstrap
intervals and differences to a reference; leave-last-out-v1 on any catalog (target = last
positive by time), holdout-v1, the scores-file coverage check; popularity on the real Goodreads
catalog lands on the reference figure."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from embsum.offline.cli import cli
from jobs_fixtures import build_catalog, tiny_checkpoint  # noqa: F401


@pytest.fixture(scope="module")
def catalog_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("eval") / "cat.duckdb"
    build_catalog(db, n_items=60, n_users=150)
    return db


def _test_users(db):
    from embsum.index.catalog import Catalog

    from embsum.evaluation.protocol import build_eval_set

    with Catalog(db, read_only=True) as cat:
        histories, items = cat.histories(), cat.items().column("item_id").to_pylist()
    return build_eval_set(histories, items, "test"), items


def test_checkpoint_scores_file_and_baselines_in_one_report(tmp_path, catalog_db, tiny_checkpoint):  # noqa: F811
    es, _ = _test_users(catalog_db)
    assert es.users
    oracle = tmp_path / "oracle.csv"  # candidates only: impressions judged, full ranking not
    lines = ["user,item,score"] + [f"{u.user_id},{i},{float(i == u.target)}" for u in es.users for i in set(u.uniform + u.pop)]
    oracle.write_text("\n".join(lines) + "\n")
    report = tmp_path / "out" / "report.json"
    result = CliRunner().invoke(cli, ["--db", str(catalog_db), "evaluate", "--checkpoint", str(tiny_checkpoint),
                                      "--scores", str(oracle), "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["protocol"] == "leave-last-out-v1" and data["evaluated_users"] == len(es.users)
    assert data["protocol_parameters"]["ties"] == "count against the model"
    assert data["split_sizes"]["test"] >= len(es.users) and data["wall_time_s"] >= 0
    rows = {r["name"].split(" ")[0]: r for r in data["models"]}
    assert {"embsum", "scores", "random", "popularity", "zero-shot"} <= set(rows)
    assert len(rows["embsum"]["hash"]) == 16
    oracle_row = rows["scores"]
    assert oracle_row["coverage"] == 1.0 and oracle_row["metrics"]["full"] is None
    assert oracle_row["metrics"]["uniform"]["ndcg@10"] == 1.0 and oracle_row["metrics"]["pop"]["auc"] == 1.0
    assert 0 <= rows["embsum"]["metrics"]["full"]["recall@100"] <= 1
    # every figure has its interval; every row but the reference its paired difference
    assert data["reference"] == "popularity" and data["bootstrap"]["resamples"] == 1000
    for row in data["models"]:
        for group, found in row["intervals"].items():
            for metric, (low, high) in found.items():
                assert low - 1e-9 <= row["metrics"][group][metric] <= high + 1e-9
        assert ("difference" in row) == (row["name"] != "popularity")
    assert set(oracle_row["intervals"]) == {"uniform", "pop"}  # no full ranking from this file
    gain = oracle_row["difference"]["metrics"]["uniform"]["ndcg@10"]
    assert gain["beats"] and gain["interval"][0] > 0
    table = report.with_suffix(".md").read_text()
    assert table in result.output and "| popularity | " in table
    pop = rows["popularity"]["metrics"]["uniform"]["auc"]
    low, high = rows["popularity"]["intervals"]["uniform"]["auc"]
    assert f"{pop:.4f} [{low:.4f}, {high:.4f}]" in table
    assert "difference to popularity" in table and f"**{gain['value']:+.4f} [" in table


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
    from embsum.offline.evaluate import read_scores_file

    pq.write_table(pa.table({"user_id": ["u1", "u1"], "item_id": ["7", "8"], "score": [0.5, 1.0]}), tmp_path / "s.parquet")
    assert read_scores_file(tmp_path / "s.parquet") == {"u1": {"7": 0.5, "8": 1.0}}
    (tmp_path / "s.tsv").write_text("user\titem\tscore\nu2\t007\t2\n")
    assert read_scores_file(tmp_path / "s.tsv") == {"u2": {"007": 2.0}}  # ids stay strings


def _write_scores(path, es, drop: int = 0):
    """An oracle scores file over every candidate pair, less the first `drop` pairs (the first
    user's target first)."""
    pairs = [(u.user_id, i, float(i == u.target)) for u in es.users
             for i in [u.target, *sorted(set(u.uniform + u.pop) - {u.target})]]
    path.write_text("\n".join(["user,item,score"] + [f"{u},{i},{s}" for u, i, s in pairs[drop:]]) + "\n")
    return len(pairs)


def test_partial_scores_are_refused_unless_allowed(tmp_path, catalog_db):
    es, _ = _test_users(catalog_db)
    scores = tmp_path / "partial.csv"
    total = _write_scores(scores, es, drop=3)
    args = ["--db", str(catalog_db), "evaluate", "--scores", str(scores), "--no-baselines",
            "--report", str(tmp_path / "r.json")]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    message = f"scores cover {total - 3:,} of {total:,} candidate pairs"
    assert message in refused.output and "pass --allow-partial" in refused.output
    assert not (tmp_path / "r.json").exists()
    allowed = CliRunner().invoke(cli, args + ["--allow-partial"])
    assert allowed.exit_code == 0, allowed.output
    assert message in allowed.output  # on screen, not only in the JSON
    row = json.loads((tmp_path / "r.json").read_text())["models"][0]
    assert row["coverage_pairs"] == {"covered": total - 3, "total": total}
    assert row["metrics"]["uniform"]["ndcg@10"] < 1.0  # a dropped target scores lowest


def test_reference_is_checked_first_and_used(tmp_path, catalog_db):
    base = ["--db", str(catalog_db), "evaluate", "--no-zero-shot", "--report", str(tmp_path / "r.json")]
    bad = CliRunner().invoke(cli, base + ["--reference", "nonesuch"])
    assert bad.exit_code == 1 and "matches no row" in bad.output and not (tmp_path / "r.json").exists()
    ok = CliRunner().invoke(cli, base + ["--reference", "rand"])
    assert ok.exit_code == 0, ok.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["reference"] == "random"
    pop = next(r for r in data["models"] if r["name"] == "popularity")
    assert pop["difference"]["reference"] == "random"
    delta = pop["difference"]["metrics"]["uniform"]["auc"]
    random_auc = data["models"][0]["metrics"]["uniform"]["auc"]
    assert delta["value"] == pytest.approx(pop["metrics"]["uniform"]["auc"] - random_auc, abs=1e-9)


def _users_in_bucket(n: int, want: int = 0) -> list[str]:
    from embsum.evaluation.protocol import bucket

    return [u for u in (f"cust{k}" for k in range(1000)) if bucket(u) == want][:n]


def test_any_catalog_target_is_the_last_positive_by_time(tmp_path):
    """Interaction logs with timestamps: the target is the latest positive (a later negative
    and a later-positioned but earlier-dated row do not count)."""
    import datetime as dt

    import pyarrow as pa
    from embsum.index.catalog import Catalog
    from embsum.offline.data import load_catalog_data
    from embsum.offline.evaluate import EvaluateConfig, Evaluation

    db = tmp_path / "log.duckdb"
    build_catalog(db, n_items=70, n_users=0)
    day = dt.datetime(2024, 1, 1)
    rows = []  # (user, item, position, days, label)
    for k, user in enumerate(_users_in_bucket(3)):
        rows += [(user, f"b{k:03d}", 0, 5, 1), (user, f"b{k + 10:03d}", 1, 1, 1),  # position 1 is older
                 (user, f"b{k + 20:03d}", 2, 9, 0)]  # the newest row is a negative
    with Catalog(db) as cat:
        cat.upsert_interactions(pa.table({
            "user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
            "position": pa.array([r[2] for r in rows], pa.int32()),
            "ts": pa.array([day + dt.timedelta(days=r[3]) for r in rows], pa.timestamp("us")),
            "label": pa.array([r[4] for r in rows], pa.int16())}))
        data = load_catalog_data(cat, summary_source="none")
    job = Evaluation(data, EvaluateConfig(baselines=False), progress=False)
    assert {u.user_id: (u.history, u.target) for u in job.eval_set.users} == {
        user: ([f"b{k + 10:03d}"], f"b{k:03d}") for k, user in enumerate(_users_in_bucket(3))}


def test_holdout_file_replaces_split_and_target(tmp_path, catalog_db):
    from embsum.index.catalog import Catalog

    with Catalog(catalog_db, read_only=True) as cat:
        histories = cat.histories()
    chosen = [u for u in sorted(histories) if len(histories[u]) >= 2][:6]  # any bucket
    holdout = tmp_path / "held.tsv"
    holdout.write_text("user_id\titem_id\n" + "".join(f"{u}\t{histories[u][0]}\n" for u in chosen))
    report = tmp_path / "r.json"
    result = CliRunner().invoke(cli, ["--db", str(catalog_db), "evaluate", "--holdout", str(holdout),
                                      "--no-zero-shot", "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["protocol"] == "holdout-v1" and data["split"] == "holdout"
    assert data["evaluated_users"] == len(chosen) and data["split_sizes"]["holdout_pairs"] == len(chosen)
    assert data["protocol_parameters"]["holdout"]["path"] == str(holdout)
    assert len(data["protocol_parameters"]["holdout"]["sha1"]) == 40
    assert "holdout-v1, holdout users" in result.output
    missing = CliRunner().invoke(cli, ["--db", str(catalog_db), "evaluate", "--holdout", str(tmp_path / "none.csv"),
                                       "--no-zero-shot", "--report", str(report)])
    assert missing.exit_code == 1 and "no such file" in missing.output


def test_rows_saved_on_one_machine_pair_user_by_user_in_another_run(tmp_path, catalog_db):
    """--per-user-out then --rows-from (a model evaluated on a GPU box, compared here): the
    imported popularity row equals this run's own, so their paired difference is exactly 0;
    rows of other cases (another split) are refused before any work."""
    saved = tmp_path / "gpu" / "rows.npz"
    base = ["--db", str(catalog_db), "evaluate", "--no-zero-shot"]
    first = CliRunner().invoke(cli, base + ["--report", str(tmp_path / "a.json"), "--per-user-out", str(saved)])
    assert first.exit_code == 0, first.output
    assert saved.exists() and not list(saved.parent.glob(".*.tmp"))
    resaved = tmp_path / "resaved.npz"  # imported rows saved again, then imported again
    second = CliRunner().invoke(cli, base + ["--report", str(tmp_path / "b.json"), "--rows-from", str(saved),
                                             "--per-user-out", str(resaved)])
    assert second.exit_code == 0, second.output
    third = CliRunner().invoke(cli, base + ["--no-baselines", "--report", str(tmp_path / "t.json"),
                                            "--rows-from", str(resaved)])
    assert third.exit_code == 0, third.output
    chained = {r["name"]: r for r in json.loads((tmp_path / "t.json").read_text())["models"]}
    assert set(chained) == {"random", "popularity", "random #2", "popularity #2"}
    assert all(r["saved_in"] == str(resaved) for r in chained.values())
    before = {r["name"]: r for r in json.loads((tmp_path / "a.json").read_text())["models"]}
    report = json.loads((tmp_path / "b.json").read_text())
    rows = {r["name"]: r for r in report["models"]}
    # imported rows come before this run's baselines, which get "#2"; the reference is the imported popularity
    assert set(rows) == {"random", "popularity", "random #2", "popularity #2"} and report["reference"] == "popularity"
    imported = rows["popularity"]
    assert imported["saved_in"] == str(saved) and imported["wall_s"] == before["popularity"]["wall_s"]
    assert imported["metrics"] == before["popularity"]["metrics"] == rows["popularity #2"]["metrics"]
    for group, found in rows["popularity #2"]["difference"]["metrics"].items():
        for metric, delta in found.items():
            assert delta["value"] == 0 and delta["interval"] == [0, 0], (group, metric)
    # random vs popularity: the same paired difference whichever run computed the random row
    mine = rows["random #2"]["difference"]["metrics"]["uniform"]["auc"]
    theirs = rows["random"]["difference"]["metrics"]["uniform"]["auc"]
    assert mine == theirs
    refused = CliRunner().invoke(cli, base + ["--split", "dev", "--report", str(tmp_path / "c.json"),
                                              "--rows-from", str(saved)])
    assert refused.exit_code == 1 and "cannot be paired" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "c.json").exists()
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    bad = CliRunner().invoke(cli, base + ["--report", str(tmp_path / "d.json"), "--rows-from", str(junk)])
    assert bad.exit_code == 1 and "not a per-user file" in bad.output and "Traceback" not in bad.output
