"""NCE and summary losses: hand-computed values and a few steps on a tiny model."""

import math

import torch

from embsum.training.losses import nce_loss, summary_nll


def test_nce_matches_hand_computation_and_excludes():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    loss = nce_loss(scores, torch.tensor([0, 1]), temperature=1.0)
    row0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1))
    row1 = -math.log(math.exp(3) / (1 + math.exp(3) + math.exp(1)))
    assert abs(loss.item() - (row0 + row1) / 2) < 1e-5
    # excluded columns drop out of the denominator; the positive itself is never excluded
    exclude = torch.tensor([[True, True, False], [False, True, False]])
    loss = nce_loss(scores, torch.tensor([0, 1]), exclude=exclude, temperature=0.5)
    row0 = -math.log(math.exp(4) / (math.exp(4) + 1))
    row1 = -math.log(math.exp(6) / (1 + math.exp(6) + math.exp(2)))
    assert abs(loss.item() - (row0 + row1) / 2) < 1e-5


def test_summary_nll_ignores_padding():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 5.0
    labels = torch.tensor([[2, -100, -100]])
    expected = -math.log(math.exp(5) / (math.exp(5) + 3))
    assert abs(summary_nll(logits, labels).item() - expected) < 1e-5


def test_losses_fall_on_a_tiny_model(tiny_bert_dir):
    from embsum.config import ModelConfig
    from embsum.model.checkpoint import build_model
    from embsum.model.scoring import poly_score

    model = build_model(ModelConfig(backbone=tiny_bert_dir, item_codes=2, user_codes=2, item_max_tokens=16))
    model.train()
    texts = ["space ships and aliens", "a cookbook of soups", "robots on mars", "baking bread at home"]
    tok = model.tokenize(texts)
    sessions = torch.tensor([[0], [1]])  # user 0 read about space, user 1 about soup
    summaries = model.summary_batch(["space science", "cooking food"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(12):
        states = model.encode_tokens(**tok)
        cpe, cpe_p = model.item_embeddings(states, tok["attention_mask"])
        out = model.user_embeddings(states, tok["attention_mask"], sessions, summaries)
        # candidates per user: [positive, negative] = [robots, bread] / [bread, robots]
        cand = torch.tensor([[2, 3], [3, 2]])
        scores = poly_score(out.upe[:, None], cpe[cand], cpe_p[cand])
        nce = nce_loss(scores, torch.zeros(2, dtype=torch.long), temperature=0.1)
        loss = nce + out.summary_nll
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((nce.item(), out.summary_nll.item()))
    assert history[-1][0] < history[0][0]
    assert history[-1][1] < history[0][1]
