"""Every way a checkpoint directory can be unusable gives one CheckpointError line, found by
`check_checkpoint` before any model is built (no 20 s backbone build, no HF or safetensors
traceback)."""

from __future__ import annotations

import json
import shutil

import pytest

from embsum.errors import EmbsumError
from embsum.model.checkpoint import CheckpointError, check_checkpoint, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "ck"
    save_checkpoint(tiny_model, path)
    return path


@pytest.fixture
def ck(saved, tmp_path):
    """A fresh copy of a good checkpoint, for a test to damage."""
    return shutil.copytree(saved, tmp_path / "ck")


@pytest.fixture
def no_backbone_build(monkeypatch):
    """Building the backbone fails the test: the error must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was built before the checkpoint was checked")

    monkeypatch.setattr("embsum.model.backbone.seq2seq_from_config", refuse)


def fails(directory, message: str, found_by_check: bool = True) -> str:
    """load_checkpoint's error: a CheckpointError (an EmbsumError), one line naming the
    checkpoint; the cheap check_checkpoint alone gives the same line."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith(f"checkpoint {directory}"), text
    assert isinstance(info.value, EmbsumError)
    if found_by_check:
        with pytest.raises(CheckpointError) as cheap:
            check_checkpoint(directory)
        assert str(cheap.value) == text
    return text


def test_a_good_checkpoint_passes_the_check(ck, no_backbone_build):
    info = check_checkpoint(ck)
    assert info.digest == (ck / "hash").read_text().strip() and info.config.item_codes == 3
    assert "backbone.encoder.embeddings.word_embeddings.weight" in info.tensors
    # ... and loading it does reach the (patched) backbone builder: the fixture patches the
    # function the loader really calls, so the tests below prove their errors come first.
    with pytest.raises(AssertionError, match="backbone was built"):
        load_checkpoint(ck)


def test_missing_path_and_file(tmp_path, no_backbone_build):
    assert fails(tmp_path / "runs" / "x", "does not exist") == f"checkpoint {tmp_path / 'runs' / 'x'} does not exist"
    (tmp_path / "file").write_text("not a directory")
    fails(tmp_path / "file", "is a file, not a checkpoint directory")


@pytest.mark.parametrize("remove,message", [
    ("config.json", "has no config.json"),
    ("hash", "has no hash file"),
    ("backbone", "has no backbone/ folder"),
    ("backbone/config.json", "backbone/ has no config.json"),
    ("backbone/tokenizer_config.json", "backbone/ has no tokenizer_config.json"),
    ("model.safetensors", "has no model.safetensors"),
])
def test_missing_parts(ck, no_backbone_build, remove, message):
    target = ck / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    fails(ck, message)


@pytest.mark.parametrize("keep", [0, 5, 8 + 40, -1000, -1])
def test_truncated_weights_fail_before_the_backbone_is_built(ck, no_backbone_build, keep):
    weights = ck / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    fails(ck, "model.safetensors is truncated or corrupt")


def test_corrupt_weights(ck, no_backbone_build):
    weights = ck / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    weights.write_bytes(bytes(data[:8]) + b"\xff" * header_len + bytes(data[8 + header_len:]))
    fails(ck, "header is not valid JSON")
    weights.write_bytes(bytes(data) + b"\0" * 16)  # trailing bytes: the header does not describe the file
    fails(ck, "the file holds")


def test_a_hugging_face_model_folder_is_not_a_checkpoint(tiny_bert_dir, no_backbone_build):
    fails(tiny_bert_dir, "names no embsum format: not an embsum checkpoint")


def test_wrong_format_and_bad_config(ck, no_backbone_build):
    config = ck / "config.json"
    meta = json.loads(config.read_text())
    config.write_text("{not json")
    fails(ck, "config.json is not valid JSON")
    config.write_text(json.dumps({**meta, "format": "something-else/3"}))
    fails(ck, "unknown checkpoint format 'something-else/3'")
    config.write_text(json.dumps({**meta, "model_config": {**meta["model_config"], "pooling": "max"}}))
    fails(ck, "bad model_config in config.json: pooling must be 'poly' or 'mean'")
    config.write_text(json.dumps({**meta, "model_config": {**meta["model_config"], "fusion": {"top_k": 9}}}))
    fails(ck, "fusion: top_k must be in [1, num_experts=4]")


def test_modules_must_match_the_weights_and_the_config(ck, no_backbone_build):
    config = ck / "config.json"
    meta = json.loads(config.read_text())
    # The config asks for a fusion layer the weights do not have (e.g. an SFT checkpoint whose
    # config was edited): refused before building, not by a strict state-dict load.
    fusion = {"d_model": 32, "num_experts": 2, "top_k": 1}
    config.write_text(json.dumps({**meta, "model_config": {**meta["model_config"], "fusion": fusion}}))
    fails(ck, "its model_config needs weights for fusion")
    config.write_text(json.dumps(meta))
    modules = ck / "modules.json"
    listed = json.loads(modules.read_text())
    modules.write_text(json.dumps([m for m in listed if m["name"] != "item_ws"]))
    fails(ck, "modules.json lists backbone, item_poly, user_poly but model.safetensors holds")
    modules.write_text('{"backbone": 1}')
    fails(ck, "modules.json is not a list of modules")


def test_weights_of_another_shape_are_one_line(ck):
    """What the header check cannot see (shapes against model_config) still ends as one line."""
    config = ck / "config.json"
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "model_config": {**meta["model_config"], "item_codes": 5}}))
    check_checkpoint(ck)  # shapes are not in its reach
    fails(ck, "weights do not fit its model_config (Error(s) in loading state_dict", found_by_check=False)
