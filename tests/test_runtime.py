"""Packed-weight inference: load without float weights, generate, and match the fake-quant model."""

from __future__ import annotations

import pytest
import torch

from lowbit.io import load_quantized, save_quantized
from lowbit.packed_linear import PackedLinear
from lowbit.ptq import rtn
from lowbit.runtime import HalfEmbedding, PackedEmbedding, generate, load_packed, module_bytes, time_decode
from lowbit.surgery import QuantConfig

from conftest import tiny_llama, tiny_tokenizer


@pytest.mark.parametrize(
    "cfg",
    [QuantConfig(bits=2, group_size=32), QuantConfig(bits=1.58), QuantConfig(bits=4, quantize_embeddings=True, group_size=32)],
    ids=["2bit-g32", "ternary", "4bit-emb"],
)
def test_packed_model_matches_quantized_model(tmp_path, cfg):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    rtn(model, cfg)
    save_quantized(model, tok, tmp_path / "q")
    fake, _, _ = load_quantized(tmp_path / "q")
    packed, tokenizer, _ = load_packed(tmp_path / "q")
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    emb = packed.get_input_embeddings()
    assert isinstance(emb, PackedEmbedding if cfg.quantize_embeddings else HalfEmbedding)
    ids = torch.randint(0, len(tok), (2, 12))
    # the fp16 head matmul and kernel summation order differ from the fp32 fake-quant path
    assert torch.allclose(packed(ids).logits, fake(ids).logits, atol=2e-2, rtol=1e-2)
    # no float copy of the quantized weights is kept: memory is close to the stored bytes
    stored = sum(1 for _ in packed.parameters())
    assert stored > 0 and module_bytes(packed) < 1.5 * (tmp_path / "q" / "model.safetensors").stat().st_size
    text = generate(packed, tokenizer, "The quick brown", max_new_tokens=5, stream=False)
    assert text.startswith("The quick brown")
    speed = time_decode(packed, ids[:1], new_tokens=3)
    assert speed["decode_tokens_per_s"] > 0 and speed["prefill_tokens_per_s"] > 0
