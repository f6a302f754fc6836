"""Real text for calibration, training and evaluation, and its cutting into token windows.

The text comes from the test data of the gensim 4.4.0 wheel (an English Wikipedia dump excerpt
and the Lee background news corpus), read from the installed package (found without importing
gensim) or straight from a downloaded wheel named by ``$LOWBIT_GENSIM_WHEEL``.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import io
import json
import os
import re
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.eval.models import cache_root, package_dir
from lowbit.store.fsio import atomic_write

GENSIM_PIP = "pip install --no-deps gensim==4.4.0"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
TEXT_NAMES = ("wiki-train", "wiki-calib", "wiki-eval", "news")
SPLITS = ("train", "calib", "eval")
EVAL_CHARS = 250_000
CALIB_CHARS = 100_000

_CLEAN_VERSION = 1
_DROP_SECTIONS = frozenset(
    {
        "references",
        "notes",
        "footnotes",
        "citations",
        "sources",
        "bibliography",
        "works cited",
        "notes and references",
        "references and notes",
        "further reading",
        "external links",
        "see also",
    }
)
_DROP_TAGS = frozenset(
    {
        "ref",
        "references",
        "gallery",
        "math",
        "chem",
        "score",
        "timeline",
        "hiero",
        "imagemap",
        "syntaxhighlight",
        "source",
    }
)
_HEADING2 = re.compile(r"^==(?!=)\s*(.*?)\s*==\s*$", re.M)
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_articles_memo: dict[str, list[tuple[str, str]]] = {}


def data_cache_dir() -> Path:
    """Folder for cleaned text caches: ``cache_root() / "data"``."""
    return cache_root() / "data"


def _missing_gensim(detail: str) -> LowbitError:
    return LowbitError(
        f"real text needs the test data of the gensim 4.4.0 wheel ({detail}): install it with "
        f"`{GENSIM_PIP}`, or run `pip download --no-deps gensim==4.4.0` and set LOWBIT_GENSIM_WHEEL "
        "to the downloaded .whl file"
    )


def gensim_data_file(name: str) -> bytes:
    """Bytes of ``gensim/test/test_data/<name>`` from ``$LOWBIT_GENSIM_WHEEL`` or the installed gensim."""
    member = f"gensim/test/test_data/{name}"
    wheel = os.environ.get("LOWBIT_GENSIM_WHEEL")
    if wheel:
        path = Path(wheel).expanduser()
        if not path.is_file():
            raise _missing_gensim(f"LOWBIT_GENSIM_WHEEL={wheel} does not exist")
        try:
            with zipfile.ZipFile(path) as archive:
                return archive.read(member)
        except zipfile.BadZipFile as exc:
            raise _missing_gensim(f"LOWBIT_GENSIM_WHEEL={wheel} is not a wheel (zip) file") from exc
        except KeyError as exc:
            raise _missing_gensim(f"LOWBIT_GENSIM_WHEEL={wheel} has no {member}") from exc
    pkg = package_dir("gensim")
    if pkg is None:
        raise _missing_gensim("gensim is not installed")
    path = pkg / "test" / "test_data" / name
    if not path.is_file():
        raise _missing_gensim(f"the installed gensim at {pkg} has no test_data/{name}")
    return path.read_bytes()


def clean_wikitext(wikitext: str) -> str:
    """Plain prose from wiki markup: drops references, link-list sections, categories and files."""
    import mwparserfromhell

    kept: list[str] = []
    pos, keep = 0, True
    for match in _HEADING2.finditer(wikitext):
        if keep:
            kept.append(wikitext[pos : match.start()])
        keep = match.group(1).strip().lower() not in _DROP_SECTIONS
        pos = match.start()
    if keep:
        kept.append(wikitext[pos:])
    code = mwparserfromhell.parse(_REF.sub("", _COMMENT.sub("", "".join(kept))))
    for node in code.filter_tags(matches=lambda n: str(n.tag).strip().lower() in _DROP_TAGS):
        try:
            code.remove(node)
        except ValueError:
            pass
    for node in code.filter_wikilinks(matches=lambda n: ":" in str(n.title).lstrip(":")):
        try:
            code.remove(node)
        except ValueError:
            pass
    text = html.unescape(code.strip_code())
    lines = [_SPACES.sub(" ", line).strip() for line in text.splitlines()]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _parse_dump(raw: bytes) -> list[tuple[str, str]]:
    articles: list[tuple[str, str]] = []
    with bz2.open(io.BytesIO(raw)) as stream:
        for _, elem in ET.iterparse(stream):
            if not elem.tag.endswith("}page"):
                continue
            title = elem.findtext("{*}title") or ""
            namespace = elem.findtext("{*}ns") or "0"
            wikitext = elem.findtext("{*}revision/{*}text") or ""
            redirect = elem.find("{*}redirect") is not None or wikitext.lstrip().upper().startswith("#REDIRECT")
            if namespace == "0" and not redirect:
                text = clean_wikitext(wikitext)
                if text:
                    articles.append((title, text))
            elem.clear()
    return articles


def _write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(payload, ensure_ascii=False))


def wikipedia_articles() -> list[tuple[str, str]]:
    """All real articles of the Wikipedia excerpt as ``(title, plain text)``, redirects dropped.

    The cleaned articles are cached as JSON under ``data_cache_dir()``, keyed by the dump's hash.
    """
    raw = gensim_data_file(WIKI_FILE)
    digest = hashlib.sha1(raw).hexdigest()[:12]
    if digest not in _articles_memo:
        path = data_cache_dir() / f"wikipedia-{digest}-v{_CLEAN_VERSION}.json"
        articles: list[tuple[str, str]] | None = None
        if path.is_file():
            try:
                articles = [(t, x) for t, x in json.loads(path.read_text(encoding="utf-8"))]
            except (ValueError, TypeError):
                articles = None
        if articles is None:
            articles = _parse_dump(raw)
            _write_json_atomic(path, articles)
        _articles_memo[digest] = articles
    return list(_articles_memo[digest])


def _title_key(title: str) -> str:
    return hashlib.sha1(title.encode("utf-8")).hexdigest()


def _article_block(article: tuple[str, str]) -> str:
    return f"{article[0]}\n\n{article[1]}"


def split_articles(articles: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Assign whole articles to eval / calib / train, deterministically by the SHA-1 of the title.

    Articles are visited in title-hash order; one goes to eval if it is at most a fifth of
    ``EVAL_CHARS`` (so eval spans several topics), eval holds under 95% of ``EVAL_CHARS`` and
    would stay under 105% with it; else likewise to calib (``CALIB_CHARS``); else to train.
    """
    targets = {"eval": EVAL_CHARS, "calib": CALIB_CHARS}
    sizes = {"eval": 0, "calib": 0}
    out: dict[str, list[tuple[str, str]]] = {name: [] for name in SPLITS}
    for article in sorted(articles, key=lambda a: (_title_key(a[0]), a[0])):
        n_chars = len(_article_block(article))
        for name, target in targets.items():
            fits = n_chars <= target // 5 and sizes[name] + n_chars <= 1.05 * target
            if sizes[name] < 0.95 * target and fits:
                out[name].append(article)
                sizes[name] += n_chars
                break
        else:
            out["train"].append(article)
    return out


def _check_split(name: str) -> None:
    if name not in SPLITS:
        raise LowbitError(f"unknown Wikipedia split {name!r}: choose one of {', '.join(SPLITS)}")


def wikipedia_split_articles(name: str) -> list[tuple[str, str]]:
    """The ``(title, text)`` articles of split ``name`` ("train", "calib" or "eval")."""
    _check_split(name)
    return split_articles(wikipedia_articles())[name]


def wikipedia_split(name: str) -> str:
    """Text of split ``name``: its articles as "title, blank line, text", separated by blank lines."""
    return "\n\n".join(_article_block(a) for a in wikipedia_split_articles(name))


def news_text() -> str:
    """The Lee background corpus (Australian news, one document per paragraph)."""
    raw = gensim_data_file(NEWS_FILE).decode("utf-8")
    return "\n\n".join(line.strip() for line in raw.splitlines() if line.strip())


def read_text_file(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file, failing clearly when it is missing, not UTF-8 or empty."""
    file = Path(path).expanduser()
    if not file.exists():
        raise LowbitError(
            f"text {str(path)!r} not found: pass one of {', '.join(TEXT_NAMES)} or a path to a UTF-8 text file"
        )
    if not file.is_file():
        raise LowbitError(f"text path {file} is not a file: pass a UTF-8 text file")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LowbitError(f"text file {file} is not valid UTF-8 ({exc}): convert it to UTF-8") from exc
    if not text.strip():
        raise LowbitError(f"text file {file} is empty (no non-whitespace characters): pass a file with text")
    if "\x00" in text:
        raise LowbitError(f"text file {file} holds NUL bytes, so it is binary data, not text: pass a UTF-8 text file")
    return text


def get_text(name_or_path: str) -> str:
    """Text by name ("wiki-train", "wiki-calib", "wiki-eval", "news") or from a UTF-8 text file."""
    if name_or_path.startswith("wiki-") and name_or_path[5:] in SPLITS:
        return wikipedia_split(name_or_path[5:])
    if name_or_path == "news":
        return news_text()
    return read_text_file(name_or_path)


def describe_text(name: str) -> str:
    """Short human description of a text name or path: source, size and licence."""
    if name.startswith("wiki-") and name[5:] in SPLITS:
        articles = wikipedia_split_articles(name[5:])
        n_chars = len(wikipedia_split(name[5:]))
        return (
            f"Wikipedia {name[5:]} split: {len(articles)} whole articles, {n_chars:,} characters, from the "
            "English Wikipedia dump excerpt in the gensim 4.4.0 test data (markup stripped); "
            "text by Wikipedia contributors, CC BY-SA 3.0"
        )
    if name == "news":
        return (
            f"Lee background corpus: Australian news articles, {len(news_text()):,} characters, "
            "from the gensim 4.4.0 test data"
        )
    file = Path(name).expanduser()
    size = f", {file.stat().st_size:,} bytes" if file.is_file() else ""
    return f"text file {file}{size}"


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _encode_prefix(tokenizer: Any, text: str, max_tokens: int | None) -> list[int]:
    """Token ids of ``text`` (at least its first ``max_tokens``), tokenizing only a prefix if enough.

    A prefix is used only when it yields 64 tokens beyond ``max_tokens``, so the kept tokens are
    those of the full text (the cut can only change tokens at its end).
    """
    if max_tokens is None:
        return _encode(tokenizer, text)
    n_chars = 8 * max_tokens + 1024
    while n_chars < len(text):
        ids = _encode(tokenizer, text[:n_chars])
        if len(ids) > max_tokens + 64:
            return ids[:max_tokens]
        n_chars *= 4
    return _encode(tokenizer, text)[:max_tokens]


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS token first when it encodes one text with special tokens."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos_id


def tokenize_windows(
    tokenizer: Any, text: str, seq_len: int, max_tokens: int | None = None, *, bos: bool = False
) -> torch.Tensor:
    """Cut ``text`` into non-overlapping windows of ``seq_len`` tokens: a LongTensor (n_windows, seq_len)
    (docs/methods.md, "Perplexity windows").

    The whole text is tokenized once as a single stream without special tokens, truncated to
    ``max_tokens`` text tokens, and cut into consecutive windows; the last partial window is
    dropped, so every text token lands in exactly one window. By default no BOS is added, neither
    at the start nor per window: each window is a plain slice of running text, which is how
    SmolLM2 (whose tokenizer adds no BOS) sees text. Models trained to always see BOS first
    (Gemma: ``tokenizer_adds_bos`` is true) score far worse without it; ``bos=True`` starts every
    window with BOS followed by ``seq_len - 1`` text tokens, so the window length, and thus the
    model's context, stays ``seq_len``.
    """
    if tokenizer is None:
        raise LowbitError(
            "the model has no tokenizer (its folder lacks tokenizer.json / tokenizer_config.json): "
            "copy the tokenizer files of its base model into the folder"
        )
    if seq_len < 2:
        raise LowbitError(f"seq_len must be at least 2 tokens (one to read, one to predict), got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise LowbitError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos and bos_id is None:
        raise LowbitError("bos=True but the tokenizer has no BOS token: tokenize without BOS")
    body = seq_len - 1 if bos else seq_len
    ids = _encode_prefix(tokenizer, text, max_tokens)
    n_windows = len(ids) // body
    if n_windows == 0:
        limit = f" (max_tokens={max_tokens})" if max_tokens is not None and len(ids) == max_tokens else ""
        need = f"{body} text tokens (plus BOS)" if bos else f"{body} tokens"
        raise LowbitError(
            f"the text has {len(ids)} tokens{limit} but seq_len={seq_len} needs at least {need} "
            "for one window: use a longer text, a larger max_tokens or a smaller seq_len"
        )
    windows = torch.tensor(ids[: n_windows * body], dtype=torch.long).view(n_windows, body)
    if bos:
        windows = torch.cat([torch.full((n_windows, 1), int(bos_id), dtype=torch.long), windows], dim=1)
    return windows


def text_fingerprint(name: str) -> str:
    """SHA-256 (16 hex digits) of a text's content: a changed text file changes the keys that name it."""
    return hashlib.sha256(get_text(name).encode("utf-8")).hexdigest()[:16]
