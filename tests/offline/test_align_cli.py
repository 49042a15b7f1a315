"""`embsum align` end to end on a tiny catalog and checkpoint: flags, recipe, resume, runs row,
and the aligned checkpoint scored by the same code as the SFT one."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from embsum.offline.cli import cli
from jobs_fixtures import build_catalog


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "catalog.duckdb"
    build_catalog(path, n_items=40, n_users=40)
    return path


def align(db, checkpoint, out, *extra):
    args = ["--db", str(db), "align", "--checkpoint", str(checkpoint), "--out", str(out), "--max-steps", "3",
            "--batch-size", "4", "--pool-size", "4", "--lora-r", "2", "--bf16", "off", "--device", "cpu",
            "--save-every", "2", "--dev-users", "5", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_align_writes_checkpoints_records_the_run_and_resumes(db, tiny_checkpoint, tmp_path):
    import numpy as np
    from embsum.index.catalog import Catalog

    from embsum.inference.encoding import encode_item_texts
    from embsum.model.checkpoint import load_checkpoint

    out = tmp_path / "aligned"
    result = align(db, tiny_checkpoint, out, "--strategy", "rodpo", "--beta", "10")
    assert result.exit_code == 0, result.output
    assert "aligned 3 steps (rodpo)" in result.output
    meta = json.loads((out / "best" / "config.json").read_text())
    assert meta["align_config"]["beta"] == 10.0 and meta["model_config"]["fusion"]["num_experts"] == 4
    with Catalog(db, read_only=True) as cat:
        runs = cat.runs("align").to_pylist()
    assert runs[-1]["status"] == "ok" and json.loads(runs[-1]["args"])["strategy"] == "rodpo"
    modules = json.loads((out / "best" / "modules.json").read_text())
    assert "fusion" in [m["name"] for m in modules]
    # The aligned checkpoint loads and encodes like any model (same code path as precompute).
    model, _ = load_checkpoint(out / "best")
    cpe, cpe_prime = encode_item_texts(model, ["a book about the sea"], progress=False)
    assert cpe.shape == (1, 3, 32) and np.isfinite(cpe_prime).all()
    # Same OUT, more steps: resumes from OUT/state at step 3.
    result = align(db, tiny_checkpoint, out, "--max-steps", "4")
    assert result.exit_code == 0, result.output
    assert "aligned 4 steps" in result.output


def test_an_alignment_does_not_depend_on_what_its_process_drew_before(db, tiny_checkpoint, tmp_path):
    """The adapters' and the MoE's initial weights are seeded by the run's seed: the same command
    twice in one process (the benchmarks align several models in one), with torch's generator
    moved in between, gives the same checkpoint; another seed gives another one."""
    import torch

    hashes = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        torch.rand(1000)  # what an earlier job in the process might have drawn
        result = align(db, tiny_checkpoint, tmp_path / name, "--seed", seed)
        assert result.exit_code == 0, result.output
        hashes.append((tmp_path / name / "best" / "hash").read_text())
    assert hashes[0] == hashes[1] != hashes[2]


def test_recipe_then_config_then_flags(db, tiny_checkpoint, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[align]\nstrategy = "hard"\nbeta = 3.0\npool_refresh = 7\n')
    config = tmp_path / "c.toml"
    config.write_text("[align]\nbeta = 4.0\n")
    out = tmp_path / "a"
    args = ["--db", str(db), "--config", str(config), "align", "--checkpoint", str(tiny_checkpoint),
            "--recipe", str(recipe), "--out", str(out), "--max-steps", "1", "--batch-size", "4", "--pool-size", "4",
            "--bf16", "off", "--device", "cpu", "--dev-users", "2", "--pool-refresh", "9"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "best" / "config.json").read_text())["align_config"]
    assert (cfg["strategy"], cfg["beta"], cfg["pool_refresh"]) == ("hard", 4.0, 9)


@pytest.mark.parametrize("args,message", [
    (["--strategy", "hardest"], "hardest"),
    (["--beta", "0"], "beta must be > 0"),
    (["--recipe", "nope"], "unknown recipe"),
])
def test_bad_input_is_one_clear_line(db, tiny_checkpoint, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["--db", str(db), "align", "--checkpoint", str(tiny_checkpoint),
                                      "--out", str(tmp_path / "x"), *args])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


def test_an_aligned_checkpoint_is_not_aligned_again_and_serves_like_any(db, tiny_checkpoint, tmp_path):
    out = tmp_path / "a1"
    assert align(db, tiny_checkpoint, out, "--strategy", "random").exit_code == 0
    result = CliRunner().invoke(cli, ["--db", str(db), "align", "--checkpoint", str(out / "best"),
                                      "--out", str(tmp_path / "a2")])
    assert result.exit_code != 0 and "already aligned" in result.output
    # precompute reads it through the one loader (it used to fail: unknown ModelConfig keys: fusion)
    result = CliRunner().invoke(cli, ["--db", str(db), "precompute", "--checkpoint", str(out / "best"),
                                      "--no-users", "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_a_missing_checkpoint_is_one_line(db, tmp_path):
    result = CliRunner().invoke(cli, ["--db", str(db), "align", "--checkpoint", str(tmp_path / "runs" / "x"),
                                      "--out", str(tmp_path / "a")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"checkpoint {tmp_path / 'runs' / 'x'} does not exist" in result.output


def test_align_cpu_recipe_counts_epochs_600_steps_on_goodreads_fewer_on_a_small_catalog():
    """The packaged align_cpu recipe runs 2.4 passes over the train users: the 600 steps its goodreads
    dev sweep chose (4,000 users, batch 16), and proportionally fewer on MovieLens' 754 users."""
    from embsum.offline.recipes import load_recipe

    from embsum.alignment.align_config import AlignConfig
    from embsum.training.loop import schedule_length

    cfg = AlignConfig.from_dict(load_recipe("align_cpu")["align"])
    assert cfg.max_steps == 0
    steps = [schedule_length(cfg.max_steps, cfg.epochs, n, cfg.batch_size, epoch_ends_batch=True) for n in (4000, 754)]
    assert steps == [600, 116]


def test_align_reads_the_token_states_train_stored(db, tiny_checkpoint, tmp_path, monkeypatch):
    """`embsum train` with a frozen encoder stores the catalog's token states beside the catalog;
    `embsum align --lora-scope decoder` of its model runs no encoder pass over the catalog."""
    from embsum.inference import encoding, state_store

    encoded: list[int] = []
    real = encoding.encode_token_states

    def counting(model, texts, *args, cache=None, **kwargs):
        encoded.append(len({t for t in texts if cache is None or t not in cache}))
        return real(model, texts, *args, cache=cache, **kwargs)

    monkeypatch.setattr(encoding, "encode_token_states", counting)
    monkeypatch.setattr(state_store, "encode_token_states", counting)
    out = tmp_path / "sft"
    result = CliRunner().invoke(cli, ["--db", str(db), "train", "--init-from", str(tiny_checkpoint), "--out", str(out),
                                      "--freeze-encoder", "--max-steps", "2", "--batch-size", "4", "--dev-users", "3",
                                      "--log-every", "0", "--bf16", "off", "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    store = tmp_path / "catalog.duckdb.states"
    assert "token states: 0 read from" in result.output and len(list(store.glob("*.pt"))) == 1
    assert encoded[0] == 40  # the 40 items, once
    written = next(store.glob("*.pt")).stat().st_mtime_ns
    encoded.clear()
    result = align(db, out / "best", tmp_path / "aligned", "--lora-scope", "decoder")
    assert result.exit_code == 0, result.output
    assert encoded and set(encoded) == {0}  # every text came from the store
    assert next(store.glob("*.pt")).stat().st_mtime_ns == written  # nothing new to write
    # `embsum evaluate` of the SFT model (its encoder is the stored one) reads them too.
    encoded.clear()
    result = CliRunner().invoke(cli, ["--db", str(db), "evaluate", "--checkpoint", str(out / "best"), "--split", "dev",
                                      "--no-baselines", "--device", "cpu", "--dtype", "fp32", "--resamples", "0",
                                      "--report", str(tmp_path / "dev.json")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert encoded and set(encoded) == {0}
    # EMBSUM_TOKEN_STATES=off: no store; the catalog is encoded again.
    monkeypatch.setenv("EMBSUM_TOKEN_STATES", "off")
    encoded.clear()
    result = align(db, out / "best", tmp_path / "aligned-again", "--lora-scope", "decoder")
    assert result.exit_code == 0, result.output
    assert max(encoded) == 40
