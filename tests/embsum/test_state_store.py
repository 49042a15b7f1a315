"""The on-disk store of encoder token states (embsum/inference/state_store.py): what one job
encodes, the next reads back exactly; another encoder never reads it; a torn or foreign file
is skipped, never fatal."""

from __future__ import annotations

import copy

import torch

TEXTS = ["a book about the sea", "a cookbook", "a long novel about a family and a farm", "a cookbook"]


def _fill(model, texts, directory, **kwargs):
    from embsum.inference.encoding import StateCache
    from embsum.inference.state_store import fill_token_states

    cache = StateCache()
    return fill_token_states(model, texts, directory, "fp32", cache, progress=False, **kwargs), cache


def test_a_second_job_reads_what_the_first_encoded(tiny_model, tmp_path):
    first, encoded = _fill(tiny_model, TEXTS, tmp_path)
    assert first["stored"] == 0 and first["encoded"] == 3  # distinct texts, encoded once
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob(".*.tmp"))
    second, read = _fill(tiny_model, TEXTS, tmp_path)
    assert second == {"stored": 3, "encoded": 0, "path": str(files[0])}
    for text in set(TEXTS):
        assert read[text].dtype == torch.bfloat16 and torch.equal(read[text], encoded[text])


def test_a_grown_catalog_encodes_only_its_new_texts_and_the_file_follows_the_catalog(tiny_model, tmp_path):
    _fill(tiny_model, TEXTS[:2], tmp_path)
    grown, _ = _fill(tiny_model, TEXTS, tmp_path)
    assert (grown["stored"], grown["encoded"]) == (2, 1)
    # A file is rewritten for the catalog that encoded something new, and holds only that
    # catalog: a dropped text is not carried on.
    changed, _ = _fill(tiny_model, [*TEXTS[2:], "a new atlas"], tmp_path)
    assert (changed["stored"], changed["encoded"]) == (2, 1)
    again, _ = _fill(tiny_model, TEXTS[:1], tmp_path)
    assert (again["stored"], again["encoded"]) == (0, 1)


def test_another_encoder_or_dtype_gets_another_file(tiny_model, tmp_path):
    from embsum.inference.state_store import store_key

    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        next(other.backbone.get_encoder().parameters()).add_(1e-3)
    assert store_key(other, "fp32") != store_key(tiny_model, "fp32")
    assert store_key(tiny_model, "bf16") != store_key(tiny_model, "fp32")
    # Weights outside the encoder (poly codes, the decoder) do not change the encoder's states.
    trained = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if not name.startswith("backbone.encoder") and "embeddings" not in name:
                p.add_(0.1)
    assert store_key(trained, "fp32") == store_key(tiny_model, "fp32")
    _fill(tiny_model, TEXTS, tmp_path)
    result, _ = _fill(other, TEXTS, tmp_path)
    assert (result["stored"], result["encoded"]) == (0, 3)
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_a_torn_file_is_skipped_with_a_warning_and_rewritten(tiny_model, tmp_path, caplog):
    first, encoded = _fill(tiny_model, TEXTS, tmp_path)
    killed_writer = tmp_path / f".{first['path'].rsplit('/', 1)[1]}.12345.tmp"
    killed_writer.write_bytes(b"half a file")
    path = tmp_path / first["path"].rsplit("/", 1)[1]
    path.write_bytes(path.read_bytes()[: 100])
    with caplog.at_level("WARNING"):
        result, cache = _fill(tiny_model, TEXTS, tmp_path)
    assert (result["stored"], result["encoded"]) == (0, 3)
    assert "not read" in caplog.text
    torch.testing.assert_close(cache[TEXTS[0]].float(), encoded[TEXTS[0]].float(), atol=1e-2, rtol=0)
    healed, _ = _fill(tiny_model, TEXTS, tmp_path)
    assert healed["stored"] == 3
    assert not killed_writer.exists()  # the next write removed the killed writer's temp file


def test_no_directory_no_store_and_readers_do_not_write(tiny_model, tmp_path):
    result, cache = _fill(tiny_model, TEXTS, None)
    assert result == {"stored": 0, "encoded": 3, "path": None} and len(cache) == 3
    reader, _ = _fill(tiny_model, TEXTS, tmp_path, write=False)  # torchrun's other ranks
    assert reader["encoded"] == 3 and not list(tmp_path.glob("*.pt"))


def test_a_store_that_cannot_be_written_does_not_fail_the_job(tiny_model, tmp_path, caplog):
    blocked = tmp_path / "a-file-not-a-directory"
    blocked.write_text("")
    with caplog.at_level("WARNING"):
        result, cache = _fill(tiny_model, TEXTS, blocked)
    assert result["encoded"] == 3 and len(cache) == 3 and "not stored" in caplog.text
