"""Packaged backbone offline (issue 2 acceptance) and a clear error for unknown names."""

import os

import pytest
import torch

from embsum.model.backbone import BackboneError, load_encoder, mean_pool, resolve


def test_unresolvable_name_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="cannot be resolved offline"):
        resolve("no-such-org/no-such-model-xyz")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(BackboneError, match="no config.json"):
        resolve(str(tmp_path))


def test_packaged_backbone_offline_paraphrase_beats_unrelated():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    encoder, tokenizer = load_encoder("packaged")
    sentences = ["A man is playing a guitar.", "Someone is strumming a guitar.",
                 "The stock market fell sharply today."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.inference_mode():
        states = encoder(**batch).last_hidden_state
    emb = torch.nn.functional.normalize(mean_pool(states, batch["attention_mask"]), dim=-1)
    paraphrase = float(emb[0] @ emb[1])
    unrelated = float(emb[0] @ emb[2])
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)


def _recording_snapshot_download(monkeypatch, tmp_path):
    """Stand-in for huggingface_hub.snapshot_download: records each call; a cache miss for
    local_files_only, a folder for a real download (no network is touched)."""
    import huggingface_hub

    calls = []

    def fake(name, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if local_files_only:
            raise FileNotFoundError(name)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def test_hub_name_is_never_downloaded_unless_allowed(monkeypatch, tmp_path):
    calls = _recording_snapshot_download(monkeypatch, tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("EMBSUM_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(BackboneError, match="--allow-download"):
        resolve("some-org/some-model")
    assert calls == [True]  # the local cache was looked at, the network was not

    monkeypatch.setenv("EMBSUM_ALLOW_DOWNLOAD", "1")
    assert resolve("some-org/some-model") == tmp_path
    assert calls == [True, True, False]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline wins over the opt-in
    with pytest.raises(BackboneError, match="HF_HUB_OFFLINE"):
        resolve("some-org/some-model")
    assert calls == [True, True, False, True]


def test_cli_allow_download_flag_switches_downloads_on(monkeypatch):
    from click.testing import CliRunner
    from embsum.offline.cli import cli

    from embsum.hub import downloads_allowed

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("EMBSUM_ALLOW_DOWNLOAD", "")  # monkeypatch restores it after the CLI's write
    assert not downloads_allowed()
    result = CliRunner().invoke(cli, ["--allow-download", "info", "--help"])
    assert result.exit_code == 0, result.output
    assert downloads_allowed()
