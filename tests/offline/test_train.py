"""`embsum train`: resume after a kill, recipe, clear errors (tiny model), and a short real run
on a Goodreads slice with the packaged MiniLM (loss falls, checkpoint reloads)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from embsum.offline.cli import cli
from jobs_fixtures import build_catalog, tiny_checkpoint  # noqa: F401

TINY = ["--batch-size", "4", "--dev-users", "3", "--log-every", "0", "--new-lr", "3e-3"]


def _state(out):
    return json.loads((out / "last" / "trainer_state.json").read_text())


def test_train_resumes_after_kill(tmp_path, tiny_checkpoint, monkeypatch):  # noqa: F811
    from embsum.training.loop import TrainingLoop

    db, out = tmp_path / "cat.duckdb", tmp_path / "run"
    build_catalog(db, n_items=40, n_users=40)
    args = ["--db", str(db), "train", "--init-from", str(tiny_checkpoint), "--out", str(out),
            "--max-steps", "6", "--save-every", "2", "--eval-every", "3", *TINY]
    real_save = TrainingLoop.save_last

    def save_then_die(self):
        digest = real_save(self)
        if self.step == 4:
            raise KeyboardInterrupt  # killed right after the step-4 checkpoint
        return digest

    monkeypatch.setattr(TrainingLoop, "save_last", save_then_die)
    killed = CliRunner().invoke(cli, args)
    assert killed.exit_code != 0
    assert _state(out)["step"] == 4
    monkeypatch.setattr(TrainingLoop, "save_last", real_save)
    resumed = CliRunner().invoke(cli, args)
    assert resumed.exit_code == 0, resumed.output
    state = _state(out)
    assert state["step"] == 6 and state["examples_seen"] == 24
    assert [x["step"] for x in state["losses"]] == [1, 2, 3, 4, 5, 6]
    assert [d["step"] for d in state["dev_history"]] == [3, 6]
    assert (out / "best" / "hash").exists() and "best dev score" in resumed.output


def _users_by_split(count: int) -> dict[str, list[str]]:
    from embsum.evaluation.protocol import split_of

    found: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for k in range(200):
        user = f"user{k}"
        if len(found[split_of(user)]) < count:
            found[split_of(user)].append(user)
    return found


def test_all_users_adds_dev_and_test_histories_to_the_examples():
    from embsum.offline.data import CatalogData, training_examples

    split = _users_by_split(2)
    histories = {u: [f"{u}-a", f"{u}-b", f"{u}-c"] for users in split.values() for u in users}
    data = CatalogData(sorted(i for h in histories.values() for i in h), [], histories, {})
    held_out = split["dev"] + split["test"]

    default = training_examples(data, "prefixes")
    assert {u for u, _, _ in default} == set(split["train"])
    assert not {t for _, _, t in default} & {i for u in held_out for i in histories[u]}

    every = training_examples(data, "prefixes", all_users=True)
    assert {u for u, _, _ in every} == set(histories)
    # every prefix of a held-out user's full history, its last item (the eval target) included
    assert {(u, t) for u, _, t in every if u in held_out} == {(u, i) for u in held_out for i in histories[u][1:]}
    last = training_examples(data, "last", all_users=True)
    assert sorted((u, t) for u, _, t in last) == sorted((u, h[-1]) for u, h in histories.items())


def test_train_all_users_records_the_flag_and_skips_dev(tmp_path, tiny_checkpoint):  # noqa: F811
    db, out = tmp_path / "cat.duckdb", tmp_path / "prod"
    build_catalog(db, n_items=40, n_users=40)
    result = CliRunner().invoke(cli, ["--db", str(db), "train", "--init-from", str(tiny_checkpoint), "--out", str(out),
                                      "--all-users", "--max-steps", "2", "--eval-every", "1", *TINY])
    assert result.exit_code == 0, result.output
    from embsum.index.catalog import Catalog
    from embsum.offline.data import load_catalog_data, training_examples

    with Catalog(db, read_only=True) as cat:
        data = load_catalog_data(cat)
    every, train_only = (len(training_examples(data, all_users=flag)) for flag in (True, False))
    assert every > train_only and f"training on {every} examples" in result.output
    assert "no held-out dev users" in result.output and "--all-users" in result.output
    for name in ("best", "last"):
        meta = json.loads((out / name / "config.json").read_text())
        assert meta["all_users"] is True and meta["step"] == 2 and "dev" not in meta
    assert _state(out)["dev_history"] == []
    # OUT/best is the last model (compared by tensors: the safetensors header order may differ)
    from safetensors.torch import load_file

    best, last = (load_file(str(out / name / "model.safetensors")) for name in ("best", "last"))
    assert best.keys() == last.keys() and all(best[k].equal(last[k]) for k in best)


def test_recipe_options_are_train_options():
    from embsum.offline.commands.train import command
    from embsum.offline.recipes import available, load_recipe

    from embsum.config import ModelConfig, TrainConfig

    params = {p.name for p in command.params}
    train_recipes = [name for name in available() if "train" in load_recipe(name)]
    assert "goodreads_cpu" in train_recipes
    for name in train_recipes:
        table = load_recipe(name)["train"]
        assert set(table) <= params, name
        TrainConfig.from_dict({k: v for k, v in table.items() if k in TrainConfig.__dataclass_fields__})
        ModelConfig.from_dict({k: v for k, v in table.items() if k in ModelConfig.__dataclass_fields__})


def test_clear_errors(tmp_path, tiny_checkpoint):  # noqa: F811
    db = tmp_path / "empty.duckdb"
    from embsum.index.catalog import Catalog

    Catalog(db).close()
    result = CliRunner().invoke(cli, ["--db", str(db), "train", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "no training examples" in result.output
    build_catalog(db, n_users=40)
    result = CliRunner().invoke(cli, ["--db", str(db), "train", "--backbone", "no-such-org/no-such-model",
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "cannot be resolved offline" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["--db", str(db), "train", "--recipe", "nope"])
    assert result.exit_code != 0 and "unknown recipe" in result.output


def _goodreads_slice(src, dst, n_users: int):
    """The first users of users.jsonl and the books they read (real text, real histories)."""
    dst.mkdir()
    users = (src / "users.jsonl").read_text().splitlines()[:n_users]
    books = {b for line in users for b in json.loads(line)["history"]}
    lines = (src / "books.tsv").read_text().splitlines()
    kept = [lines[0]] + [ln for ln in lines[1:] if ln.split("\t", 1)[0] in books]
    (dst / "books.tsv").write_text("\n".join(kept) + "\n")
    (dst / "users.jsonl").write_text("\n".join(users) + "\n")
    return dst


@pytest.mark.slow
def test_train_real_goodreads_slice_loss_falls_and_reloads(goodreads_dir, tmp_path):
    import numpy as np

    from embsum.inference.encoding import encode_item_texts, encode_user_histories
    from embsum.model.checkpoint import checkpoint_hash, load_checkpoint
    from embsum.model.scoring import poly_score_matrix

    data = _goodreads_slice(goodreads_dir, tmp_path / "gr", 40)
    db, out = tmp_path / "gr.duckdb", tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", str(db), "-q", "ingest", "--format", "goodreads", str(data)]).exit_code == 0
    result = runner.invoke(cli, [
        "--db", str(db), "train", "--out", str(out), "--freeze-encoder", "--freeze-embeddings",
        "--decoder-layers", "1", "--item-max-tokens", "48", "--item-codes", "4", "--user-codes", "4",
        "--train-users", "16", "--examples", "last", "--batch-size", "8", "--max-steps", "10",
        "--dev-users", "4", "--new-lr", "3e-3", "--summary-weight", "0.5", "--log-every", "0"])
    assert result.exit_code == 0, result.output
    losses = [x["loss"] for x in _state(out)["losses"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    model, digest = load_checkpoint(out / "best")
    assert digest == checkpoint_hash(out / "best")
    texts = ["Dune. A desert planet.", "Emma. Matchmaking in a village."]
    cpe, cpe_p = encode_item_texts(model, texts, progress=False)
    upe = encode_user_histories(model, [texts[:1]], progress=False)
    scores = poly_score_matrix(upe, cpe, cpe_p)
    assert np.isfinite(scores).all() and scores.shape == (1, 2)
