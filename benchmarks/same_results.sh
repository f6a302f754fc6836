#!/usr/bin/env bash
# Run lowbit from source tree SRC (e.g. a git worktree of an older commit) on the default model and keep
# every folder and JSON in OUT; benchmarks/same_results_compare.py OLD NEW compares two such runs.
# Usage: benchmarks/same_results.sh SRC OUT   (about 10 minutes on 2 quiet cores)
# repro.sh SRC OUT: quantize + eval the default model with the lowbit at SRC; results in OUT
set -euo pipefail
SRC=$1; OUT=$2; mkdir -p "$OUT"
export PYTHONPATH=$SRC/src HF_HUB_OFFLINE=1
python -c "import lowbit, sys; print(lowbit.__file__)" > "$OUT/which.txt"
run() { local name=$1; shift; /usr/bin/time -f "%e s %M KB" -o "$OUT/$name.time" python -m lowbit.cli quantize --model smollm2-135m --out "$OUT/$name" --json "$@" > "$OUT/$name.quantize.json" 2> "$OUT/$name.quantize.err"
  python -m lowbit.cli eval --model "$OUT/$name" --data wiki-eval --max-tokens 8192 --json > "$OUT/$name.eval.json" 2> "$OUT/$name.eval.err"; }
run rtn4g128 --method rtn --bits 4 --group-size 128
run gptq3g128 --method gptq --bits 3 --group-size 128
run budget35 --budget-bpw 3.5
python -m lowbit.cli export "$OUT/rtn4g128" --out "$OUT/rtn4g128.gguf" --json > "$OUT/export.json" 2> "$OUT/export.err" || true
