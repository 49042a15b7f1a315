"""Catalog upserts and the read API the model jobs code against (docs/ARCHITECTURE.md)."""

import datetime as dt

import pyarrow as pa
import pytest
from embsum.index.catalog import KEY_VERSION, Catalog, content_hash, history_hash, item_key, item_text


@pytest.fixture
def cat(db_file):
    with Catalog(db_file) as c:
        yield c


def _items(ids, titles, descriptions):
    return pa.table({"item_id": ids, "title": titles, "description": descriptions})


def _updated_at(cat):
    return dict(cat.con.execute("SELECT item_id, updated_at FROM items").fetchall())


def test_item_upsert_touches_only_changed_rows(cat):
    assert cat.upsert_items(_items(["a", "b", "c"], ["A", "B", "C"], ["x", "y", None])) == \
        {"new": 3, "updated": 0, "unchanged": 0, "users_changed": 0}
    before = _updated_at(cat)
    assert cat.upsert_items(_items(["a", "b", "c"], ["A", "B", "C"], ["x", "y", None])) == \
        {"new": 0, "updated": 0, "unchanged": 3, "users_changed": 0}
    assert _updated_at(cat) == before
    counts = cat.upsert_items(_items(["a", "b", "d"], ["A", "B", "D"], ["x", "changed", "z"]))
    assert counts == {"new": 1, "updated": 1, "unchanged": 1, "users_changed": 0}
    after = _updated_at(cat)
    assert after["a"] == before["a"] and after["c"] == before["c"] and after["b"] > before["b"]
    items = cat.items().to_pylist()
    assert [r["item_id"] for r in items] == ["a", "b", "c", "d"]
    assert items[1]["content_hash"] == content_hash("B. changed") != content_hash("B. y")


def test_items_filter_iter_items_and_existing(cat):
    cat.upsert_items(_items([f"i{k:02d}" for k in range(7)], ["t"] * 7, [str(k) for k in range(7)]))
    assert cat.items(["i03", "nope"]).column("item_id").to_pylist() == ["i03"]
    chunks = list(cat.iter_items(3))
    assert [c.num_rows for c in chunks] == [3, 3, 1]
    assert [i for c in chunks for i in c.column("item_id").to_pylist()] == [f"i{k:02d}" for k in range(7)]
    assert set(cat.items().column_names) == {"item_id", "title", "description", "category", "content_hash"}
    assert cat.existing_items(["i01", "zz"]) == {"i01"}


def _assert_users_match_histories(cat):
    """Every user's key covers the content keys of the history items, in history order."""
    hist, keys = cat.histories(), cat.history_keys()
    item_keys = dict(cat.con.execute("SELECT item_id, content_hash FROM items").fetchall())
    users = cat.users().to_pydict()
    assert set(users["user_id"]) == set(hist) == set(keys)
    for user, h in zip(users["user_id"], users["history_hash"]):
        assert keys[user] == [item_keys.get(i, f"missing:{i}") for i in hist[user]]
        assert h == history_hash(keys[user])


def test_snapshot_interactions_replace_changed_users_only(cat):
    rows = pa.table({"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "c"], "position": [0, 1, 0]})
    assert cat.upsert_interactions(rows, replace_users=True)["users_changed"] == 2
    stamp = dict(cat.con.execute("SELECT user_id, updated_at FROM users").fetchall())
    again = cat.upsert_interactions(rows, replace_users=True)
    assert again == {"new": 0, "updated": 0, "unchanged": 3, "users_changed": 0}
    assert dict(cat.con.execute("SELECT user_id, updated_at FROM users").fetchall()) == stamp
    # u1's history is now [b, a] (the old rows go); u2 is not in the batch and stays.
    cat.upsert_interactions(pa.table({"user_id": ["u1", "u1"], "item_id": ["b", "a"], "position": [0, 1]}),
                            replace_users=True)
    assert cat.histories() == {"u1": ["b", "a"], "u2": ["c"]}
    assert cat.count("interactions") == 3
    _assert_users_match_histories(cat)


def test_event_interactions_order_by_time_and_labels(cat):
    t = dt.datetime(2020, 1, 1)
    rows = pa.table({
        "user_id": ["u", "u", "u", "u", "u"],
        "item_id": ["h", "late", "early", "skipped", "h"],
        "position": [0, 1, 2, 3, 0],  # the history row repeats, as on every MIND impression
        "ts": [None, t + dt.timedelta(hours=2), t, t, None],
        "label": [1, 1, 1, 0, 1],
    })
    assert cat.upsert_interactions(rows)["new"] == 4
    assert cat.histories() == {"u": ["h", "early", "late"]}
    assert cat.upsert_interactions(rows)["unchanged"] == 4
    # A label change is an update, and changes the user's history hash.
    flipped = rows.set_column(4, "label", pa.array([1, 1, 1, 1, 1], pa.int64()))
    counts = cat.upsert_interactions(flipped)
    assert counts["updated"] == 1 and counts["users_changed"] == 1
    assert cat.histories(["u", "unknown"]) == {"u": ["h", "early", "skipped", "late"]}
    _assert_users_match_histories(cat)


def test_user_with_only_negatives_has_empty_history(cat):
    cat.upsert_interactions(pa.table({"user_id": ["u"], "item_id": ["x"], "position": [0], "label": [0]}))
    assert cat.histories() == {"u": []}
    _assert_users_match_histories(cat)


def test_transaction_is_reentrant_and_rolls_back_whole(cat):
    with pytest.raises(RuntimeError), cat.transaction():
        cat.upsert_items(_items(["a"], ["A"], ["x"]))  # joins the outer transaction
        raise RuntimeError("boom")
    assert cat.count("items") == 0
    with cat.transaction():
        cat.upsert_items(_items(["a"], ["A"], ["x"]))
    assert cat.count("items") == 1


def test_clear_rejects_per_source(cat):
    cat.add_rejects([{"line": 2, "raw": "x", "reason": "empty_text"}], None, "f1")
    cat.add_rejects([{"line": 3, "raw": "y", "reason": "missing_id"}], None, "f2")
    assert cat.clear_rejects("f1") == 1
    assert cat.arrow("SELECT source FROM rejects").column(0).to_pylist() == ["f2"]


def test_running_row_of_a_dead_process_becomes_interrupted(tmp_path):
    import subprocess
    import sys

    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        live = cat.start_run("precompute")
        dead = cat.start_run("refresh")
        finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True, check=True)
        cat.con.execute("UPDATE runs SET pid = ? WHERE run_id = ?", [int(finished.stdout), dead])
        cat.con.execute("INSERT INTO runs (run_id, kind, started_at, status, host, pid) "
                        "VALUES ('elsewhere', 'train', now(), 'running', 'another-host', 1)")
        assert cat.mark_interrupted_runs() == [dead]
        status = dict(cat.con.execute("SELECT run_id, status FROM runs").fetchall())
    # this process is alive; another host's row cannot be checked from here and stays as it is
    assert status == {live: "running", dead: "interrupted", "elsewhere": "running"}


# -- keys: what a vector depends on (issue 13) ----------------------------------------------------
def test_item_text_template_and_key_is_the_hash_of_exactly_that_text():
    assert item_text("Dune", "A desert planet.") == "Dune. A desert planet."
    assert item_text("Dune", "A desert planet.", "sci-fi") == "Dune. sci-fi. A desert planet."
    assert item_text(" Dune ", None, " ") == "Dune" and item_text(None, "", None) == ""
    assert item_key("Dune", "A desert planet.", "sci-fi") == content_hash("Dune. sci-fi. A desert planet.")
    # the same text from other fields is the same key: nothing the model does not read counts
    assert item_key(" Dune", "A desert planet. ") == item_key("Dune", "A desert planet.")
    assert item_key("Dune", "x", "a") != item_key("Dune", "x", "b")


def test_item_edit_rekeys_exactly_the_users_holding_it_positively(cat):
    cat.upsert_items(_items(["a", "b", "c"], ["A", "B", "C"], ["x", "y", "z"]))
    cat.upsert_interactions(pa.table({"user_id": ["u1", "u1", "u2", "u3"], "item_id": ["a", "b", "b", "a"],
                                      "position": [0, 1, 0, 0], "label": [1, None, 1, 0]}))
    before = dict(zip(*cat.users().to_pydict().values()))
    counts = cat.upsert_items(_items(["a", "c"], ["A", "C"], ["edited", "z"]))
    assert counts == {"new": 0, "updated": 1, "unchanged": 1, "users_changed": 1}
    after = dict(zip(*cat.users().to_pydict().values()))
    # u1 holds a; u2 does not; u3 only saw it (label 0), which is no part of a history
    assert after["u1"] != before["u1"] and after["u2"] == before["u2"] and after["u3"] == before["u3"]
    _assert_users_match_histories(cat)
    # a category is read by the model: a category-only edit is an edit
    assert cat.upsert_items(pa.table({"item_id": ["b"], "title": ["B"], "description": ["y"],
                                      "category": ["new"]}))["users_changed"] == 2


def test_history_hash_follows_history_order(cat):
    cat.upsert_items(_items(["a", "b"], ["A", "B"], ["x", "y"]))
    cat.upsert_interactions(pa.table({"user_id": ["u", "u", "v", "v"], "item_id": ["a", "b", "b", "a"],
                                      "position": [0, 1, 0, 1]}))
    hashes = dict(zip(*cat.users().to_pydict().values()))
    assert hashes["u"] != hashes["v"]
    _assert_users_match_histories(cat)


def test_interacted_counts_every_label(cat):
    t = dt.datetime(2020, 1, 1)
    cat.upsert_interactions(pa.table({"user_id": ["u", "u", "u", "u", "w"], "item_id": ["b", "a", "c", "a", "a"],
                                      "position": [0, 1, 2, 3, 0], "ts": [t, t, t, t, t],
                                      "label": [1, 0, None, 1, 0]}))
    assert cat.histories() == {"u": ["b", "c", "a"], "w": []}
    assert cat.interacted() == {"u": ["a", "b", "c"], "w": ["a"]}
    assert cat.interacted(["w", "nobody"]) == {"w": ["a"]}


def _downgrade_keys(cat):
    """Make `cat` look like a catalog written before KEY_VERSION 2: old-style item and user keys
    (fields hashed apart, users keyed on item ids), a summary under the old user key."""
    from embsum.index.catalog import _sha1
    from embsum.index.summaries import summary_key, upsert_summaries

    with cat.transaction():
        for item_id, title, desc, category in cat.con.execute(
                "SELECT item_id, title, description, category FROM items").fetchall():
            cat.con.execute("UPDATE items SET content_hash = ? WHERE item_id = ?",
                            [_sha1([title or "", desc or "", category or ""]), item_id])
        for user, items in cat.histories().items():
            cat.con.execute("UPDATE users SET history_hash = ? WHERE user_id = ?", [_sha1(items), user])
        old = cat.scalar("SELECT history_hash FROM users WHERE user_id = 'u1'")
        upsert_summaries(cat, [{"user_id": "u1", "summary": "likes A", "backend": "import", "model": "m",
                                "prompt_hash": "p", "history_hash": old, "summary_key": summary_key(old, "p", "m")}])
        cat.con.execute("DELETE FROM meta WHERE key = 'key_version'")


def test_old_catalog_is_rekeyed_once_and_keeps_its_summaries(db_file):
    from embsum.index.summaries import pending_users, summary_key, training_summaries

    with Catalog(db_file) as cat:
        cat.upsert_items(pa.table({"item_id": ["a", "b"], "title": ["A", "B"], "description": ["x", "y"],
                                   "category": ["k", None]}))
        cat.upsert_interactions(pa.table({"user_id": ["u1", "u1"], "item_id": ["a", "b"], "position": [0, 1]}))
        _downgrade_keys(cat)
        old_items = dict(cat.con.execute("SELECT item_id, content_hash FROM items").fetchall())
    with Catalog(db_file) as cat:  # a writer's open upgrades
        assert cat.scalar("SELECT value FROM meta WHERE key = 'key_version'") == KEY_VERSION
        items = dict(cat.con.execute("SELECT item_id, content_hash FROM items").fetchall())
        assert items == {"a": item_key("A", "x", "k"), "b": item_key("B", "y")} and items["a"] != old_items["a"]
        _assert_users_match_histories(cat)
        new_hash = cat.users(["u1"])["history_hash"][0].as_py()
        assert training_summaries(cat) == {"u1": "likes A"}  # carried to the new key, not lost
        assert cat.scalar("SELECT summary_key FROM summaries") == summary_key(new_hash, "p", "m")
        assert pending_users(cat, "p", "m") == []
        assert cat.upgrade_keys() is False  # once
