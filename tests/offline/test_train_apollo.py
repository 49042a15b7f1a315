"""`embsum train --optimizer apollo` / `embsum align --optimizer apollo-mini` on a tiny catalog
(the optimizer itself: tests/embsum/test_apollo.py)."""

from __future__ import annotations

import json

from click.testing import CliRunner
from embsum.offline.cli import cli
from jobs_fixtures import build_catalog, tiny_checkpoint  # noqa: F401

TINY = ["--batch-size", "4", "--dev-users", "3", "--log-every", "0", "--new-lr", "3e-3", "--bf16", "off",
        "--device", "cpu"]


def test_train_with_apollo_writes_its_low_rank_state_and_refuses_another_optimizer(tmp_path, tiny_checkpoint):  # noqa: F811
    from safetensors.torch import load_file

    db, out = tmp_path / "cat.duckdb", tmp_path / "run"
    build_catalog(db, n_items=40, n_users=40)
    args = ["--db", str(db), "train", "--init-from", str(tiny_checkpoint), "--out", str(out), "--max-steps", "2",
            *TINY]
    result = CliRunner().invoke(cli, [*args, "--optimizer", "apollo"])
    assert result.exit_code == 0, result.output
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["optimizer"]["name"] == "apollo"
    assert state["optimizer"]["values"] and all(v["step"] == 2 for v in state["optimizer"]["values"].values())
    moments = load_file(str(out / "last" / "optimizer.safetensors"))
    # d = 32: the encoder's 32 x 32 and 64 x 32 matrices keep 8 x 32 / 8 x 64 moments (rank d/4)
    shapes = {tuple(t.shape) for k, t in moments.items() if k.endswith(".exp_avg")}
    assert {(8, 32), (8, 64)} <= shapes and (32, 32) not in shapes
    refused = CliRunner().invoke(cli, [*args, "--max-steps", "3", "--optimizer", "adamw"])
    assert refused.exit_code == 1 and "--optimizer apollo" in refused.output and "Traceback" not in refused.output


def test_align_takes_the_optimizer_option():
    result = CliRunner().invoke(cli, ["align", "--help"])
    assert result.exit_code == 0 and "apollo-mini" in result.output
    from embsum.alignment.align_config import AlignConfig
    from embsum.training.loop import LoopConfig

    assert LoopConfig.of(AlignConfig(optimizer="apollo-mini")).optimizer == "apollo-mini"
