"""`embsum train` under torchrun (2 processes, gloo on CPU): the same loss curve and final weights
as one process with the same global batch, and a run killed after a save resumes to the same
weights. Tiny model without dropout (so both runs compute the same function), tiny catalog."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jobs_fixtures import ROOT, build_catalog, cli, tiny_backbone

STEPS = 4
ARGS = ["--max-steps", str(STEPS), "--save-every", "2", "--batch-size", "4", "--negatives", "3",
        "--all-users", "--log-every", "0", "--new-lr", "3e-3", "--bf16", "off", "--device", "cpu"]

# SIGKILL the process right after the step-2 OUT/last is written (only rank 0 writes it).
KILL_AFTER_SAVE = """
import os, signal
from embsum.training.loop import TrainingLoop
save_last = TrainingLoop.save_last

def save_then_die(self):
    digest = save_last(self)
    if self.step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return digest

TrainingLoop.save_last = save_then_die
from embsum.offline.cli import main
main()
"""


def checkpoint_without_dropout(directory: Path) -> Path:
    """The jobs' tiny BERT-based EmbSum with every dropout at 0 (one process and two then
    compute the same function)."""
    from transformers import BertConfig

    from embsum.config import ModelConfig
    from embsum.model.checkpoint import build_model, save_checkpoint

    backbone = tiny_backbone(directory.parent / "backbone")
    config = BertConfig.from_pretrained(str(backbone))
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(str(backbone))
    model = build_model(ModelConfig(backbone=str(backbone), item_codes=3, user_codes=2, item_max_tokens=32), seed=0)
    assert all(m.p == 0 for m in model.modules() if m.__class__.__name__ == "Dropout")
    save_checkpoint(model, directory)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(catalog, checkpoint, the single-process run's OUT)."""
    root = tmp_path_factory.mktemp("dist")
    db, ckpt, single = root / "cat.duckdb", checkpoint_without_dropout(root / "ckpt"), root / "single"
    build_catalog(db, n_items=40, n_users=24)
    cli("--db", db, "train", "--init-from", ckpt, "--out", single, *ARGS)
    return db, ckpt, single


def torchrun(db: Path, ckpt: Path, out: Path, script: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "EMBSUM_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    program = [str(script)] if script else ["-m", "embsum.offline.cli"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *program, "--db", str(db), "train", "--init-from", str(ckpt), "--out", str(out), *ARGS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)


def state(out: Path) -> dict:
    return json.loads((out / "last" / "trainer_state.json").read_text())


def assert_same_run(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    losses_a, losses_b = state(a)["losses"], state(b)["losses"]
    assert [x["step"] for x in losses_a] == [x["step"] for x in losses_b] == list(range(1, STEPS + 1))
    for x, y in zip(losses_a, losses_b):
        assert x.keys() == y.keys()
        np.testing.assert_allclose([x[k] for k in x], [y[k] for k in x], rtol=0, atol=2e-4)
    weights_a, weights_b = (load_file(str(out / "last" / "model.safetensors")) for out in (a, b))
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        np.testing.assert_allclose(weights_a[key].numpy(), weights_b[key].numpy(), rtol=0, atol=2e-4, err_msg=key)


def runs_rows(db: Path) -> list[tuple]:
    from embsum.index.catalog import Catalog

    with Catalog(db, read_only=True) as cat:
        return cat.arrow("SELECT kind, status FROM runs ORDER BY started_at").to_pylist()


@pytest.mark.slow
def test_two_processes_equal_one_process(setup, tmp_path):
    db, ckpt, single = setup
    before = len(runs_rows(db))
    result = torchrun(db, ckpt, tmp_path / "ddp")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("done:") == 1  # rank 0 alone speaks
    assert_same_run(single, tmp_path / "ddp")
    assert state(tmp_path / "ddp")["examples_seen"] == state(single)["examples_seen"] == STEPS * 4
    rows = runs_rows(db)[before:]
    assert rows == [{"kind": "train", "status": "ok"}]  # one row, written by rank 0


@pytest.mark.slow
def test_two_processes_resume_after_a_kill(setup, tmp_path):
    db, ckpt, single = setup
    script = tmp_path / "kill_after_save.py"
    script.write_text(KILL_AFTER_SAVE)
    out = tmp_path / "ddp"
    killed = torchrun(db, ckpt, out, script)
    assert killed.returncode != 0
    assert state(out)["step"] == 2
    resumed = torchrun(db, ckpt, out)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(single, out)
