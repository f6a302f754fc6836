"""Tests for lowbit.eval.data: synthetic text and a fake gensim wheel for unit tests, real text under ``real``."""

from __future__ import annotations

import bz2
import json
import logging
import zipfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lowbit.errors import LowbitError
from lowbit.eval import data

WORDS = "the cat sat on a mat and dog ran to park".split()

PAGE = """<page><title>{title}</title><ns>{ns}</ns><id>1</id>{redirect}
<revision><id>2</id><text xml:space="preserve">{text}</text></revision></page>"""
DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
{pages}
</mediawiki>"""
ARTICLE = (
    "'''Cat''' is a [[mammal|small animal]].&lt;ref&gt;A book, p. 3&lt;/ref&gt; It likes "
    "{{convert|3|m}} [[fish]]&amp;nbsp;milk.\n\n== History ==\nCats lived with people.\n\n"
    "== References ==\n* Some citation\n[[Category:Animals]]"
)


def make_tokenizer(adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained in memory; ``adds_bos`` makes it prepend BOS like Gemma's."""
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>"]))
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", model_max_length=8)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    monkeypatch.delenv("LOWBIT_GENSIM_WHEEL", raising=False)
    data._articles_memo.clear()
    return cache


def words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def fake_wheel(path: Path, pages: list[tuple[str, int, bool, str]]) -> Path:
    """Write a zip holding a tiny Wikipedia dump and news file where the gensim wheel has them."""
    xml = DUMP.format(
        pages="\n".join(
            PAGE.format(title=t, ns=ns, redirect='<redirect title="X" />' if red else "", text=text)
            for t, ns, red, text in pages
        )
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"gensim/test/test_data/{data.WIKI_FILE}", bz2.compress(xml.encode()))
        archive.writestr(f"gensim/test/test_data/{data.NEWS_FILE}", "First story.\nSecond story.\n")
    return path


def test_read_text_file(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("\ufeffhello wörld\r\nline two\n", encoding="utf-8")
    assert data.get_text(str(path)) == "hello wörld\nline two\n"
    assert str(path) in data.describe_text(str(path))


def test_missing_text_file(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="not found.*wiki-eval"):
        data.get_text(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_text_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(LowbitError, match="is empty"):
        data.get_text(str(path))


def test_bad_text_files(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="not a file"):
        data.get_text(str(tmp_path))
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LowbitError, match="not valid UTF-8"):
        data.get_text(str(path))


def test_tokenize_windows_shapes(tokenizer: PreTrainedTokenizerFast) -> None:
    text = words(103)
    windows = data.tokenize_windows(tokenizer, text, seq_len=10)
    assert windows.dtype == torch.long and windows.shape == (10, 10)
    expected = tokenizer(text, add_special_tokens=False)["input_ids"][:100]
    assert windows.flatten().tolist() == expected
    assert data.tokenize_windows(tokenizer, text, seq_len=10, max_tokens=35).shape == (3, 10)
    assert data.tokenize_windows(tokenizer, text, seq_len=103).shape == (1, 103)


def test_tokenize_windows_no_bos(tokenizer: PreTrainedTokenizerFast) -> None:
    windows = data.tokenize_windows(tokenizer, words(40), seq_len=20)
    assert tokenizer.bos_token_id not in windows.flatten().tolist()


def test_tokenize_windows_prefix_matches_full(tokenizer: PreTrainedTokenizerFast) -> None:
    text = words(20_000)
    full = data.tokenize_windows(tokenizer, text, seq_len=16)
    short = data.tokenize_windows(tokenizer, text, seq_len=16, max_tokens=160)
    assert torch.equal(short, full[:10])


def test_tokenize_windows_with_bos(tokenizer: PreTrainedTokenizerFast) -> None:
    text = words(50)
    windows = data.tokenize_windows(tokenizer, text, seq_len=10, bos=True)
    assert windows.shape == (5, 10)
    assert windows[:, 0].tolist() == [tokenizer.bos_token_id] * 5
    plain = data.tokenize_windows(tokenizer, text, seq_len=9)
    assert torch.equal(windows[:, 1:], plain[:5])
    with pytest.raises(LowbitError, match="needs at least 9 text tokens"):
        data.tokenize_windows(tokenizer, words(8), seq_len=10, bos=True)


def test_tokenizer_adds_bos(tokenizer: PreTrainedTokenizerFast) -> None:
    assert not data.tokenizer_adds_bos(tokenizer)
    with_bos = make_tokenizer(adds_bos=True)
    assert with_bos("cat").input_ids == [1, with_bos.convert_tokens_to_ids("cat")]
    assert data.tokenizer_adds_bos(with_bos)
    assert data.tokenize_windows(with_bos, words(20), seq_len=5)[:, 0].tolist() != [1] * 4


def test_tokenize_windows_too_short(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(LowbitError, match="has 5 tokens but seq_len=8 needs at least 8"):
        data.tokenize_windows(tokenizer, words(5), seq_len=8)
    with pytest.raises(LowbitError, match=r"has 4 tokens \(max_tokens=4\)"):
        data.tokenize_windows(tokenizer, words(50), seq_len=8, max_tokens=4)
    with pytest.raises(LowbitError, match="seq_len"):
        data.tokenize_windows(tokenizer, words(50), seq_len=0)


def test_tokenize_windows_no_length_warning(tokenizer: PreTrainedTokenizerFast) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        data.tokenize_windows(tokenizer, words(100), seq_len=8)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "longer than the specified maximum" in r.getMessage()]


def test_clean_wikitext() -> None:
    text = data.clean_wikitext(
        "'''Cat''' is a [[mammal|small animal]].<ref>A book</ref> Cute&nbsp;pet.<!-- hidden -->\n\n"
        "== History ==\nOld.\n\n== See also ==\n* [[Dog]]\n[[Category:Animals]]\n[[de:Katze]]"
    )
    assert text == "Cat is a small animal. Cute pet.\n\nHistory\nOld."


def test_wikipedia_from_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_cache: Path) -> None:
    wheel = fake_wheel(
        tmp_path / "gensim.whl",
        [
            ("Cat", 0, False, ARTICLE),
            ("Kitty", 0, True, "#REDIRECT [[Cat]]"),
            ("Dog", 0, False, "#redirect [[Canis]]"),
            ("Wikipedia:About", 4, False, "Project page."),
            ("Fish", 0, False, "Fish swim &amp;amp; eat."),
        ],
    )
    monkeypatch.setenv("LOWBIT_GENSIM_WHEEL", str(wheel))
    articles = data.wikipedia_articles()
    assert [t for t, _ in articles] == ["Cat", "Fish"]
    assert articles[0][1] == "Cat is a small animal. It likes fish milk.\n\nHistory\nCats lived with people."
    assert articles[1][1] == "Fish swim & eat."
    cached = list((isolated_cache / "data").glob("wikipedia-*.json"))
    assert len(cached) == 1
    assert [t for t, _ in json.loads(cached[0].read_text())] == ["Cat", "Fish"]
    assert not list((isolated_cache / "data").glob(".*"))
    assert data.news_text() == "First story.\n\nSecond story."
    assert data.get_text("news") == data.news_text()


def test_wheel_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_GENSIM_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(LowbitError, match="does not exist.*pip install --no-deps gensim==4.4.0"):
        data.news_text()
    bad = tmp_path / "bad.whl"
    bad.write_text("not a zip")
    monkeypatch.setenv("LOWBIT_GENSIM_WHEEL", str(bad))
    with pytest.raises(LowbitError, match="not a wheel"):
        data.news_text()
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("other.txt", "x")
    with pytest.raises(LowbitError, match="has no gensim/test/test_data"):
        data.news_text()


def test_gensim_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "package_dir", lambda module: None)
    with pytest.raises(LowbitError, match="`pip install --no-deps gensim==4.4.0`"):
        data.get_text("wiki-eval")


def test_split_articles_disjoint_and_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "EVAL_CHARS", 5_000)
    monkeypatch.setattr(data, "CALIB_CHARS", 2_000)
    articles = [(f"Article {i}", "x" * (50 + 37 * (i % 10))) for i in range(200)]
    split = data.split_articles(articles)
    again = data.split_articles(list(reversed(articles)))
    assert split == again
    titles = {name: {t for t, _ in arts} for name, arts in split.items()}
    assert not titles["eval"] & titles["calib"] and not titles["eval"] & titles["train"]
    assert not titles["calib"] & titles["train"]
    assert set().union(*titles.values()) == {t for t, _ in articles}
    sizes = {name: sum(len(t) + 2 + len(x) for t, x in arts) for name, arts in split.items()}
    assert 0.95 * 5_000 <= sizes["eval"] <= 1.05 * 5_000
    assert 0.95 * 2_000 <= sizes["calib"] <= 1.05 * 2_000


def test_unknown_split() -> None:
    with pytest.raises(LowbitError, match="unknown Wikipedia split"):
        data.wikipedia_split("test")


@pytest.mark.real
def test_real_wikipedia_split() -> None:
    articles = data.wikipedia_articles()
    assert len(articles) == 106
    split = {name: data.wikipedia_split_articles(name) for name in data.SPLITS}
    titles = {name: [t for t, _ in arts] for name, arts in split.items()}
    all_titles = [t for name in data.SPLITS for t in titles[name]]
    assert len(all_titles) == len(set(all_titles)) == len(articles)
    data._articles_memo.clear()
    assert data.wikipedia_split("eval") == "\n\n".join(f"{t}\n\n{x}" for t, x in split["eval"])
    assert 200_000 < len(data.get_text("wiki-eval")) < 300_000
    assert 80_000 < len(data.get_text("wiki-calib")) < 120_000
    assert len(data.get_text("wiki-train")) > 2_000_000
    assert "CC BY-SA" in data.describe_text("wiki-eval")
    assert len(data.get_text("news")) > 300_000
