"""The whole flow a user runs, on a small slice of the real Goodreads data, through the CLI:
ingest -> train -> align -> precompute -> index -> score --retrieve -> evaluate -> edit one
item's text -> refresh.

What it pins down (issue 13):
- an aligned checkpoint is served unchanged by precompute/index/score/evaluate, and the vectors
  stored for it equal the RoDPO policy's own forward pass (SFT model + the saved LoRA adapters,
  unmerged, + the MoE fusion layer), not just "something loadable";
- no recommended item is one the user interacted with (any label);
- after an edit of one item's text, refresh re-encodes exactly that item and the users whose
  history holds it.
A tiny BERT backbone keeps it fast on 2 CPU cores; the data and every job are real.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from jobs_fixtures import cli, tiny_backbone

N_USERS = 120


def goodreads_slice(source: Path, target: Path) -> Path:
    """The first N_USERS users of users.jsonl and every book in their histories (plus 40 more)."""
    users = [json.loads(line) for line in (source / "users.jsonl").read_text().splitlines()[:N_USERS]]
    wanted = {b for u in users for b in u["history"]}
    lines = (source / "books.tsv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    kept = [r for r in rows if r.split("\t", 1)[0] in wanted]
    kept += [r for r in rows if r.split("\t", 1)[0] not in wanted][:40]
    target.mkdir()
    (target / "books.tsv").write_text("\n".join([header, *kept]) + "\n")
    (target / "users.jsonl").write_text("".join(json.dumps(u) + "\n" for u in users))
    return target


def run_rows(db: Path, kind: str) -> list[dict]:
    from embsum.index.catalog import Catalog

    with Catalog(db, read_only=True) as cat:
        return cat.runs(kind).to_pylist()


def policy_vectors(sft: Path, aligned: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """CPE, CPE' of the policy as it trained: SFT weights, the saved adapters (not merged) and
    the MoE fusion layer with the aligned checkpoint's weights."""
    import torch
    from safetensors.torch import load_file

    from embsum.inference.encoding import encode_item_texts
    from embsum.model.checkpoint import WEIGHTS, load_checkpoint
    from embsum.model.lora import load_adapters
    from embsum.model.moe import MoEConfig, MoEFusion

    model, _ = load_checkpoint(sft)
    meta = json.loads((aligned / "config.json").read_text())
    moe = MoEFusion(MoEConfig(**meta["model_config"]["fusion"]))
    fusion = {k.removeprefix("fusion."): v for k, v in load_file(str(aligned / WEIGHTS)).items()
              if k.startswith("fusion.")}
    moe.load_state_dict(fusion, strict=True)
    peft = load_adapters(model, aligned.parent / "adapters")
    policy_model = peft.get_base_model()
    policy_model.set_fusion(moe)
    with torch.no_grad():
        return encode_item_texts(policy_model.eval(), texts, progress=False, dtype="fp32")


@pytest.mark.slow
def test_whole_flow_on_real_goodreads(goodreads_dir, tmp_path):
    from embsum.index import embeddings as E
    from embsum.index.catalog import Catalog
    from embsum.offline.texts import item_texts

    from embsum.model.checkpoint import checkpoint_hash

    data = goodreads_slice(goodreads_dir, tmp_path / "goodreads")
    db = tmp_path / "flow.duckdb"
    backbone = tiny_backbone(tmp_path / "backbone")
    sft, aligned = tmp_path / "sft", tmp_path / "align"
    base = ["--db", db]

    cli(*base, "ingest", data, "--format", "goodreads")
    cli(*base, "train", "--out", sft, "--backbone", backbone, "--max-steps", "4", "--batch-size", "8",
        "--item-max-tokens", "32", "--dev-users", "10", "--bf16", "off", "--device", "cpu")
    cli(*base, "align", "--checkpoint", sft / "best", "--out", aligned, "--max-steps", "3", "--batch-size", "4",
        "--pool-size", "8", "--lora-r", "2", "--lora-scope", "all", "--dev-users", "10", "--bf16", "off",
        "--device", "cpu", "--save-every", "3")
    served = aligned / "best"
    best, last = (json.loads((aligned / d / "config.json").read_text()) for d in ("best", "last"))
    assert best["step"] == last["step"] == 3  # the saved adapters are the final policy's
    model_hash = checkpoint_hash(served)

    # fp32: compared with an fp32 forward pass below ('auto' runs bf16 on an AVX512-BF16 or AMX CPU)
    cli(*base, "precompute", "--checkpoint", served, "--dtype", "fp32")
    cli(*base, "index", "--checkpoint", served)

    # The served vectors are the policy's own (adapters unmerged + MoE), not a lookalike.
    with Catalog(db, read_only=True) as cat:
        items = cat.items()
        stored = E.read(cat, model_hash, E.ITEM, items["item_id"].to_pylist())
    texts = item_texts(items)
    cpe, cpe_prime = policy_vectors(sft / "best", served, texts)
    order = {i: k for k, i in enumerate(items["item_id"].to_pylist())}
    rows = [order[i] for i in stored.ids]
    np.testing.assert_allclose(stored.vectors["cpe"], cpe[rows], rtol=0, atol=1e-5)
    np.testing.assert_allclose(stored.vectors["cpe_prime"], cpe_prime[rows], rtol=0, atol=1e-5)

    # Recommendations never repeat what the user already interacted with.
    cli(*base, "score", "--checkpoint", served, "--retrieve", "30", "--top", "10")
    with Catalog(db, read_only=True) as cat:
        recs = cat.arrow("SELECT user_id, item_id FROM scores WHERE model_hash = ?", [model_hash]).to_pylist()
        seen = cat.interacted(sorted({r["user_id"] for r in recs}))
    assert len(recs) >= 10 * 50
    assert not [r for r in recs if r["item_id"] in set(seen.get(r["user_id"], []))]

    result = cli(*base, "evaluate", "--checkpoint", served, "--split", "dev", "--no-zero-shot",
                 "--report", str(tmp_path / "evaluation.json"))  # not into the working directory
    assert "nDCG" in result.output or "ndcg" in result.output

    # Edit one item's text; refresh re-encodes it and exactly the users whose history holds it.
    with Catalog(db, read_only=True) as cat:
        histories = cat.histories()
    counts: dict[str, int] = {}
    for history in histories.values():
        for item in set(history):
            counts[item] = counts.get(item, 0) + 1
    edited = max(sorted(counts), key=counts.get)  # the item most users hold
    holders = {u for u, h in histories.items() if edited in h}
    row = next(r for r in items.to_pylist() if r["item_id"] == edited)
    change = tmp_path / "edit.tsv"
    change.write_text("book_id\ttitle\tdescription\n"
                      f"{edited}\t{row['title']}\tA rewritten description that the model must read.\n")
    cli(*base, "refresh", change, "--checkpoint", served)
    refresh = run_rows(db, "refresh")[-1]
    assert refresh["status"] == "ok"
    refreshed = json.loads(refresh["counts"])
    assert refreshed["items_encoded"] == 1
    assert refreshed["users_encoded"] == len(holders) > 1
    with Catalog(db, read_only=True) as cat:
        keyed = E.keys(cat, model_hash, E.USER).to_pylist()
    assert {r["user_id"] for r in keyed} >= holders
