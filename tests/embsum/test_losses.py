"""NCE and summary losses: hand-computed values and a few steps on a tiny model."""

import math

import pytest
import torch

from embsum.training.losses import linear_nll, nce_loss, summary_nll


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_nll_equals_the_logits_cross_entropy_with_its_gradients(dtype):
    """linear_nll (the vocabulary in slices, no [N, vocab] tensor) gives the NLL of F.linear's
    logits and the same gradients for the rows, the weight and the bias; in fp32 and under bf16
    autocast (where both compute the logits in bf16), with a last slice shorter than the rest."""
    torch.manual_seed(0)
    n, d, vocab = 7, 16, 1000
    labels = torch.tensor([0, 999, 5, 256, 257, 511, 512])  # both ends, and either side of a slice edge
    leaves = (torch.randn(n, d), torch.randn(vocab, d) * 0.3, torch.randn(vocab) * 0.1)

    def run(loss_fn):
        h, w, b = (t.clone().requires_grad_(True) for t in leaves)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_fn(torch.tanh(h), w, b)  # a computed input, as the head's is
        loss.backward()
        return loss.detach(), h.grad, w.grad, b.grad

    reference = run(lambda h, w, b: summary_nll(torch.nn.functional.linear(h, w, b), labels))
    sliced = run(lambda h, w, b: linear_nll(h, w, b, labels, chunk=256))
    atol = 1e-5 if dtype == torch.float32 else 2e-3  # bf16: each path rounds its own sums
    for got, want in zip(sliced, reference):
        assert torch.allclose(got, want, atol=atol), (got - want).abs().max()
    assert reference[0].item() > 1.0 and reference[2].abs().max() > 1e-3  # not a trivial case
    # without a bias, and with the weight frozen (the recipe's tied, fixed word embeddings)
    h = torch.randn(n, d, requires_grad=True)
    loss = linear_nll(h, leaves[1], None, labels, chunk=300)
    assert torch.allclose(loss, summary_nll(h @ leaves[1].T, labels), atol=1e-5)
    loss.backward(retain_graph=True)
    assert h.grad is not None
    with pytest.raises(RuntimeError, match="runs once"):  # its logits became gradients: no silent reuse
        loss.backward()


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


@pytest.mark.parametrize("backbone", ["tiny_bert_dir", "tiny_t5_dir", "tiny_bart_dir"])
def test_summary_nll_scores_only_the_labelled_positions_and_matches_the_full_head(backbone, request):
    """decode() scores the LM head's labelled positions only, with linear_nll: its NLL and global
    vector equal those of the full [B, T, vocab] logits (HF's own forward, no hook; BART's adds
    its final_logits_bias), gradients included (the head's bias and tied weight among them), and
    the swap is gone afterwards (the backbone's own forward gives full logits again)."""
    from transformers.modeling_outputs import BaseModelOutput

    from embsum.config import ModelConfig
    from embsum.model.checkpoint import build_model
    from embsum.training.losses import summary_nll

    model = build_model(ModelConfig(backbone=request.getfixturevalue(backbone), item_codes=2, user_codes=2,
                                    item_max_tokens=24)).eval()  # eval: no dropout, gradients still flow
    tok = model.tokenize(["space ships and aliens", "a cookbook of soups", "robots"])
    states = model.encode_tokens(**tok).detach()
    # users with a long, a short and no summary: most positions of the batch are padding
    summaries = model.summary_batch(["space science and the stars of far galaxies", "soup", None])
    global_vec, nll = model.decode(states, tok["attention_mask"], summaries)
    nll.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    full = model.backbone(encoder_outputs=BaseModelOutput(last_hidden_state=states),
                          attention_mask=tok["attention_mask"], decoder_input_ids=summaries["decoder_input_ids"],
                          decoder_attention_mask=summaries["decoder_attention_mask"],
                          output_hidden_states=True, use_cache=False, return_dict=True)
    assert full.logits.shape[:2] == summaries["labels"].shape  # no hook left behind
    reference = summary_nll(full.logits, summaries["labels"])
    reference.backward()
    assert torch.allclose(nll, reference, atol=1e-5)
    assert torch.allclose(global_vec, model.global_proj(full.decoder_hidden_states[-1][:, 0]), atol=1e-5)
    for name, p in model.named_parameters():
        if name in grads and name.startswith("backbone."):
            assert torch.allclose(grads[name], p.grad, atol=1e-5), name
    assert any(name.startswith("backbone.") for name in grads)
    head = model.backbone.get_output_embeddings()
    assert type(head) is torch.nn.Linear and "forward" not in head.__dict__  # linear_nll's path, undone
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in head.parameters())


@pytest.mark.parametrize("backbone", ["tiny_bert_dir", "tiny_t5_dir", "tiny_bart_dir"])
def test_decoder_projects_only_the_real_memory_tokens_to_keys_and_values(backbone, request):
    """decode() runs the cross-attention key/value projections over the memory's real tokens
    (the test above checks the NLL, global vector and gradients against HF's own padded forward).
    Here: every key/value projection saw exactly the real tokens, the projections are plain again
    afterwards, and a user with no memory token at all keeps the padded path (its attention spreads
    over padding, so packing would change its vector)."""
    from embsum.config import ModelConfig
    from embsum.model.checkpoint import build_model
    from embsum.model.embsum_model import MEMORY_PROJECTIONS

    model = build_model(ModelConfig(backbone=request.getfixturevalue(backbone), item_codes=2, user_codes=2,
                                    item_max_tokens=24)).eval()
    projections = {name: m for name, m in model.backbone.named_modules() if name.endswith(MEMORY_PROJECTIONS)}
    assert len(projections) == 2 * 2  # keys and values of both decoder layers of the tiny backbones
    rows = []

    def recording(forward):
        def record(x, *args, **kwargs):
            rows.append(tuple(x.shape[:-1]))
            return forward(x, *args, **kwargs)
        return record

    recorders = {}
    for name, m in projections.items():
        recorders[name] = m.forward = recording(m.forward)  # the rows each projection really computes
    tok = model.tokenize(["space ships and aliens on a long journey", "a cookbook of soups", "robots"])
    mask = tok["attention_mask"]
    with torch.inference_mode():
        states = model.encode_tokens(**tok)
        packed_vec, _ = model.decode(states, mask)
        assert 0 < int(mask.sum()) < mask.numel()  # the batch has padding to skip
        assert rows == [(int(mask.sum()),)] * len(projections)
        assert all(m.forward is recorders[name] for name, m in projections.items())  # restored as they were
        rows.clear()
        empty = mask.clone()
        empty[2] = 0  # the third user has no memory token
        empty_vec, _ = model.decode(states, empty)
        assert rows == [tuple(mask.shape)] * len(projections)
    assert torch.allclose(empty_vec[:2], packed_vec[:2], atol=1e-5)


def test_decode_without_summaries_returns_no_nll_and_the_same_global_vector(tiny_model):
    tok = tiny_model.tokenize(["robots on mars", "soup"])
    with torch.inference_mode():
        states = tiny_model.encode_tokens(**tok)
        global_vec, nll = tiny_model.decode(states, tok["attention_mask"])
        with_empty, nll_empty = tiny_model.decode(states, tok["attention_mask"], tiny_model.summary_batch([None, None]))
    assert nll is None and nll_empty is None
    assert torch.allclose(global_vec, with_empty, atol=1e-6)
