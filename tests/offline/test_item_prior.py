"""A model with an item prior (ModelConfig.item_prior) through precompute -> index -> score: the
stored vectors are d + 1 wide, and the certified exact top-N still equals brute force (the prior
is one more column of every vector, so FAISS inner products and the bound carry it)."""

import numpy as np
import pytest
from embsum.index import embeddings as E
from embsum.index import snapshot as S
from embsum.index.catalog import Catalog
from embsum.offline.job_configs import ScoreConfig
from embsum.offline.scoring import rank_users, read_users
from jobs_fixtures import cli, tiny_backbone


@pytest.fixture(scope="module")
def prior_checkpoint(tmp_path_factory):
    import torch

    from embsum.config import ModelConfig
    from embsum.model.checkpoint import build_model, save_checkpoint

    root = tmp_path_factory.mktemp("prior")
    backbone = tiny_backbone(root / "backbone")
    model = build_model(ModelConfig(backbone=str(backbone), item_codes=3, user_codes=2, item_max_tokens=32,
                                    item_prior="content"), seed=0)
    with torch.no_grad():  # a prior as large as the scores, so it decides part of the ranking
        model.item_prior.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        model.item_prior.bias.fill_(0.2)
    save_checkpoint(model, root / "ckpt")
    return root / "ckpt", model.d


def test_certified_top_n_equals_brute_force_with_the_prior(catalog, prior_checkpoint):
    from embsum.model.checkpoint import checkpoint_hash
    from embsum.model.scoring import poly_score_matrix

    ckpt, d = prior_checkpoint
    cli("--db", catalog, "precompute", "--checkpoint", ckpt)
    cli("--db", catalog, "index", "--checkpoint", ckpt)
    h = checkpoint_hash(ckpt)
    with Catalog(catalog, read_only=True) as cat:
        users, items = E.read(cat, h, E.USER), E.read(cat, h, E.ITEM)
        seen = cat.interacted(users.ids)
        ranked_users = read_users(cat, h, None, seen=True)
    cpe, cpe_p, upe = items.vectors["cpe"], items.vectors["cpe_prime"], users.vectors["upe"]
    assert cpe.shape[-1] == cpe_p.shape[-1] == upe.shape[-1] == d + 1
    assert np.all(upe[..., d] == 1) and np.all(cpe_p[..., d] == 0)
    prior = cpe[:, 0, d]
    assert np.ptp(prior) > 0.1 and np.allclose(cpe[..., d], prior[:, None], atol=1e-6)
    scores = poly_score_matrix(upe, cpe, cpe_p).astype(np.float64)
    for k, u in enumerate(users.ids):
        scores[k, [items.ids.index(i) for i in seen.get(u, [])]] = -np.inf
    top = 5
    result = rank_users(S.load(catalog.with_suffix(".index"), h), ranked_users, ScoreConfig(top=top, retrieve=2),
                        "run")
    assert result.counts["users_certified_exact"] == len(users.ids)
    got = {}
    for u, s in zip(result.table["user_id"].to_pylist(), result.table["score"].to_pylist()):
        got.setdefault(u, []).append(s)
    for k, u in enumerate(users.ids):
        np.testing.assert_allclose(got[u], np.sort(scores[k])[::-1][:top], atol=1e-5)
