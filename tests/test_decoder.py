"""lowbit's lean decode loop (lowbit.runtime.decoder.Decoder) against the transformers forward."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from lowbit.errors import LowbitError
from lowbit.ptq.gptq import rtn
from lowbit.quant.surgery import QuantConfig
from lowbit.runtime.decoder import Decoder, resolve_engine, unsupported_reason
from lowbit.runtime.packed import generate, load_packed, module_bytes, time_decode
from lowbit.runtime.packed_linear import PackedLinear
from lowbit.store.folder import save_quantized


def tiny_qwen2(vocab_size=128, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def step_logits(decoder: Decoder, ids: torch.Tensor, split: int) -> torch.Tensor:
    """Logits of every position: the first ``split`` tokens as one prompt, then one at a time."""
    decoder.reset()
    out = []
    for j in range(ids.numel()):
        if j < split - 1:
            continue
        if j == split - 1:
            out.append(decoder.forward(ids[:split]))
        else:
            out.append(decoder.forward(ids[j : j + 1]))
    return torch.stack(out)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("split", [1, 5, 20])
def test_decoder_matches_transformers_fp32(make, split):
    """Prompt of 1, 5 or 20 tokens (20 > KERNEL_MAX_BATCH: the module path), then single steps."""
    model = make()
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(input_ids=ids[None]).logits[0, split - 1 :]
    got = step_logits(Decoder(model, max_len=32), ids, split)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


def _packed(tmp_path, cfg, activations="float", make=tiny_llama):
    tok = tiny_tokenizer()
    model = make(vocab_size=len(tok))
    rtn(model, cfg)
    save_quantized(model, tok, tmp_path / "q")
    packed, tok, _ = load_packed(tmp_path / "q", activations=activations)
    return packed, tok


@pytest.mark.parametrize(
    "cfg,make",
    [(QuantConfig(bits=4, group_size=32), tiny_llama), (QuantConfig(bits=1.58), tiny_llama),
     (QuantConfig(bits=4, group_size=32), tiny_qwen2)],
    ids=["4bit", "ternary", "qwen2-4bit-qkv-bias"],
)
def test_decoder_on_packed_model_fuses_without_copies(tmp_path, cfg, make):
    """q/k/v and gate/up run as one kernel call each, the layers become views of the fused buffers
    (no extra bytes), and the logits match the transformers forward of the same packed model."""
    packed, tok = _packed(tmp_path, cfg, make=make)
    ids = torch.randint(0, len(tok), (12,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = packed(input_ids=ids[None]).logits[0, 3:]
    before = module_bytes(packed)
    decoder = Decoder(packed, max_len=16)
    fast = decoder.fast[0]
    assert fast.qkv.sizes is not None and fast.gate_up.sizes is not None  # fused
    assert isinstance(fast.qkv.fused, PackedLinear) and len(fast.qkv.fns) == 1
    attn = packed.model.layers[0].self_attn
    assert attn.k_proj.packed.data_ptr() == attn.q_proj.packed.data_ptr() + attn.q_proj.packed.numel()
    assert module_bytes(packed) == before
    from lowbit.runtime import kernels

    assert (decoder.c_layers is not None) == kernels.available()  # single steps: every block in one C call
    got = step_logits(decoder, ids, 4)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    decoder.c_layers = None  # the same steps through the PyTorch ops
    assert torch.allclose(step_logits(decoder, ids, 4), got, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # the original modules still compute the same thing
        assert torch.allclose(packed(input_ids=ids[None]).logits[0, 3:], ref, atol=1e-5)


def test_decoder_int8_and_generate_agree_with_transformers(tmp_path, monkeypatch):
    packed, tok = _packed(tmp_path, QuantConfig(bits=4, group_size=32), activations="int8")
    assert isinstance(packed.model.layers[0].mlp.down_proj, PackedLinear)
    a = generate(packed, tok, "The quick brown", max_new_tokens=8, stream=False, engine="lowbit")
    b = generate(packed, tok, "The quick brown", max_new_tokens=8, stream=False, engine="transformers")
    assert a.startswith("The quick brown") and a == b
    # the timed decode runs the greedy continuation: record the tokens it feeds back
    fed = []
    forward = Decoder.forward

    def recording(self, ids):
        if ids.numel() == 1:
            fed.append(int(ids))
        return forward(self, ids)

    prompt = torch.tensor([[5, 6, 7]])
    monkeypatch.setattr(Decoder, "forward", recording)
    speed = time_decode(packed, prompt, new_tokens=3, engine="lowbit")
    monkeypatch.undo()
    assert set(speed) == {"prefill_tokens_per_s", "decode_tokens_per_s"}
    assert fed == Decoder(packed, max_len=8).generate(prompt[0], max_new_tokens=3)


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_decode_step_honours_portable_isa(tmp_path, monkeypatch, activations):
    """LOWBIT_ISA=portable reaches the C decode step (its projections and attention loops): the
    logits match the default path's up to float summation order, and, where the default is AVX2,
    differ from them (so the switch is not ignored); forcing the ISA by argument agrees exactly."""
    from lowbit.runtime import kernels

    if not kernels.available():
        pytest.skip("lowbit kernels unavailable")
    packed, tok = _packed(tmp_path, QuantConfig(bits=4, group_size=32), activations=activations)
    ids = torch.randint(0, len(tok), (12,), generator=torch.Generator().manual_seed(3))
    decoder = Decoder(packed, max_len=16)
    assert decoder.c_layers is not None
    default = step_logits(decoder, ids, 1)  # every position a single-token C step
    monkeypatch.setenv("LOWBIT_ISA", "portable")
    portable = step_logits(decoder, ids, 1)
    monkeypatch.delenv("LOWBIT_ISA")
    # only the summation order differs (int8: exact integer sums, float scaling in another order)
    assert torch.allclose(portable, default, atol=1e-4, rtol=1e-4), (portable - default).abs().max()
    if kernels.isa() == "avx2":
        assert not torch.equal(portable, default)
    # the isa argument: "portable" is exactly what the environment switch ran, no argument the default
    x = torch.randn(packed.config.hidden_size)
    cos, sin = decoder.cos[0], decoder.sin[0]

    def step(**isa):
        y = x.clone()
        kernels.decode_layers(decoder.c_layers, y, 0, cos, sin, decoder._scratch, **isa)
        return y

    forced = step(isa="portable")
    monkeypatch.setenv("LOWBIT_ISA", "portable")
    assert torch.equal(step(), forced)
    monkeypatch.delenv("LOWBIT_ISA")
    assert torch.equal(step(), step(isa=kernels.isa()))


def test_unsupported_models_and_limits():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    assert "gpt2" in unsupported_reason(gpt2)
    assert resolve_engine(gpt2, "auto") == "transformers"
    with pytest.raises(LowbitError, match="--engine transformers"):
        resolve_engine(gpt2, "lowbit")
    with pytest.raises(LowbitError, match="engine must be"):
        resolve_engine(gpt2, "fast")
    with pytest.raises(LowbitError, match="cannot run this model"):
        Decoder(gpt2)
    decoder = Decoder(tiny_llama(), max_len=4)
    with pytest.raises(LowbitError, match="max_len"):
        decoder.forward(torch.arange(5))


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_decoder_long_prompts_on_packed_model(tmp_path, activations):
    """Prompts above KERNEL_MAX_BATCH run fused q/k/v and gate/up GEMMs: from an empty cache
    (plain causal attention) and as a second chunk on a filled cache (masked), both equal to the
    transformers forward of the same packed model at the last position."""
    packed, tok = _packed(tmp_path, QuantConfig(bits=4, group_size=32), activations=activations)
    ids = torch.randint(0, len(tok), (45,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = packed(input_ids=ids[None]).logits[0]
    decoder = Decoder(packed, max_len=64)
    assert decoder.fast[0].qkv.fused is not None
    # float32 summation order differs between the GEMMs and the per-row kernels (and the head's
    # paths): ~2e-4 on logits of ~0.3 here, the same before the fused prompt path existed
    first = decoder.forward(ids[:20])
    assert torch.allclose(first, ref[19], atol=1e-3, rtol=1e-3), (first - ref[19]).abs().max()
    second = decoder.forward(ids[20:])  # 25 tokens after 20 cached ones
    assert torch.allclose(second, ref[44], atol=1e-3, rtol=1e-3), (second - ref[44]).abs().max()
    assert int(second.argmax()) == int(ref[44].argmax())


def test_decode_step_thread_team_equals_per_projection_threads(tmp_path):
    """With int8 activations and 2+ threads a single-token step runs on one OpenMP team
    (lb_decode_layers_team); one thread runs each projection on its own (lb_run_rows). Every row
    is computed by the same kernel either way, so the logits agree bit for bit."""
    from lowbit.runtime import kernels

    if not kernels.available() or not kernels.has_openmp():
        pytest.skip("needs the kernels with OpenMP")
    packed, tok = _packed(tmp_path, QuantConfig(bits=2, group_size=32), activations="int8")
    ids = torch.randint(0, len(tok), (10,), generator=torch.Generator().manual_seed(4))
    out = {}
    try:
        for threads in (1, 2, 3):
            kernels.set_num_threads(threads)
            decoder = Decoder(packed, max_len=16)
            assert decoder.c_layers is not None
            out[threads] = step_logits(decoder, ids, 3)
    finally:
        kernels.set_num_threads(None)
    assert torch.equal(out[1], out[2]) and torch.equal(out[1], out[3])
