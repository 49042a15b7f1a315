"""oneDNN-prepacked Linear layers (CPU inference): same outputs as nn.Linear and as the plain
model, adapters left alone, the original model untouched."""

import numpy as np
import pytest
import torch
from torch import nn

from embsum.config import ModelConfig
from embsum.inference import encoding, packed_linear
from embsum.inference.encoding import encode_item_texts, encode_user_histories
from embsum.model.checkpoint import build_model
from embsum.model.lora import LoraSettings, add_lora

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="torch built without oneDNN")

TEXTS = ["A tale of two cities. Revolution and love.", "Dune. Sand, spice and prophecy on a desert planet.",
         "Cooking for one.", "The hobbit. A small hero with a long walk.", "Cats.", ""]
HISTORIES = [TEXTS[:3], [TEXTS[4]], [], TEXTS]


@pytest.mark.parametrize("shape", [(0, 12), (1, 12), (5, 12), (2, 7, 12), (3, 0, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(12, 20, bias=bias)
    x = torch.randn(*shape)
    fp32 = packed_linear.PackedLinear(linear, torch.float32)
    torch.testing.assert_close(fp32(x), linear(x), atol=1e-5, rtol=1e-5)
    if not packed_linear.available(torch.bfloat16):
        return  # oneDNN's bf16 kernels need AVX512-BW; such CPUs run bf16 under plain autocast
    bf16 = packed_linear.PackedLinear(linear, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = linear(x)
    out = bf16(x)
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_packed_copy_leaves_the_model_alone_and_adapters_unpacked(tiny_bert_dir):
    model = build_model(ModelConfig(backbone=tiny_bert_dir, item_codes=2, user_codes=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = add_lora(model, LoraSettings(r=2, alpha=4, dropout=0.0))
    packed = packed_linear.packed_copy(adapted)
    kinds = {type(m).__name__ for m in packed.modules()}
    assert "PackedLinear" in kinds
    for name, module in packed.named_modules():
        if type(module) is nn.Linear:  # the only plain Linear layers left sit in LoRA layers
            assert "lora_" in name or name.endswith("base_layer"), name
    assert model.training and all(p.requires_grad for n, p in adapted.named_parameters() if "lora_" in n)
    # other parameters are shared, not copied (only the packed weights cost memory)
    shared = dict(packed.named_parameters())
    assert all(shared[n] is p for n, p in adapted.named_parameters() if n in shared)
    assert any("embeddings" in n for n in shared)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k in before)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        packed_linear.packed_copy(model, torch.float16)


@pytest.mark.parametrize("backbone", ["tiny_bert_dir", "tiny_t5_dir"])
def test_encoding_with_packed_linears_equals_the_plain_model(backbone, request, monkeypatch):
    """fp32 encoding runs a packed copy on CPU; switched off (EMBSUM_PACK_LINEARS=0) it runs the
    model itself. Both give the same CPE, CPE' and UPE (to float rounding), and bf16 stays close."""
    model = build_model(ModelConfig(backbone=request.getfixturevalue(backbone), item_codes=3, user_codes=2,
                                    item_max_tokens=24)).eval()
    packed = encode_item_texts(model, TEXTS, progress=False, batch_size=4), \
        encode_user_histories(model, HISTORIES, progress=False, batch_size=3)
    bf16 = encode_item_texts(model, TEXTS, progress=False, dtype="bf16")
    copies = encoding._INFERENCE_COPIES[model]
    assert "fp32" in copies and ("bf16" in copies) == packed_linear.available(torch.bfloat16)
    assert any(isinstance(m, packed_linear.PackedLinear) for m in copies["fp32"][1].modules())
    monkeypatch.setenv("EMBSUM_PACK_LINEARS", "0")
    assert not packed_linear.available()
    plain = encode_item_texts(model, TEXTS, progress=False, batch_size=4), \
        encode_user_histories(model, HISTORIES, progress=False, batch_size=3)
    for got, want in zip([*packed[0], packed[1]], [*plain[0], plain[1]]):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert (bf16[0] * plain[0][0]).sum(-1).min() > 0.99
