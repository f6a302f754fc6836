"""Shared fixtures: tiny random causal LMs and a tiny tokenizer, so tests need no real weights."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# In CI (CI=true, as .ci/run sets it) the GGUF / llama.cpp tests must run: a test skipped because
# one of these modules is missing fails instead, naming the module, so a broken install of
# llama-cpp-python cannot pass CI as a quiet skip. Outside CI such tests skip as before.
CI_REQUIRED_MODULES = ("llama_cpp", "gguf")


def ci_missing_modules(env=None) -> list[str]:
    """Modules CI requires that are not importable here (empty outside CI)."""
    env = os.environ if env is None else env
    if env.get("CI", "").strip().lower() not in ("true", "1", "yes"):
        return []
    return [m for m in CI_REQUIRED_MODULES if importlib.util.find_spec(m) is None]


_CI_MISSING = ci_missing_modules()


def _fail_required_skip(report) -> None:
    if not (_CI_MISSING and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    named = [m for m in _CI_MISSING if m in reason]
    if named:
        report.outcome = "failed"
        report.longrepr = (
            f"CI=true requires {', '.join(named)} (install llama-cpp-python / gguf as .ci/run does); "
            f"this test would have been skipped: {reason}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_required_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_required_skip(outcome.get_result())  # module-level importorskip("gguf")

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps real weights to a few levels. "
    "Low-bit language models run on phones, laptops and cheap servers. "
) * 40


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab_size: int = 128, hidden: int = 64, layers: int = 2, tied: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 5 // 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny Llama + tokenizer folder, loadable by lowbit.eval.models.load_model."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def sample_text_file(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE_TEXT)
    return path


def six_bit_weight(rows: int = 24, cols: int = 40, group: int = 16):
    """A 6-bit min-max quantized random weight (groups of ``group``) and a random bias, seeded."""
    from lowbit.quant.quantizers import make_quantizer

    torch.manual_seed(0)
    q = make_quantizer(6, "minmax", group)
    w = torch.randn(rows, cols)
    q.initialize(w, search="none")
    q.round_scales_()
    return q.quantize(w), torch.randn(rows)
