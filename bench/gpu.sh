#!/usr/bin/env bash
# Everything this project checks on a CUDA GPU, as one script for a machine that may have
# no package registry (docs/benchmarks.md, docs/study.md):
#   1. the GPU version of the extension study (studies/extension/run.py --scale gpu),
#   2. the gpu-marked tests (tests/test_gpu.py),
#   3. training throughput and MFU (bench/bench_train.py --device cuda),
#   4. issue 12's training checks (bench/bench_gpu_train.py): sdpa / flex_attention against
#      fp32 eager on LongRecipe ids, a 1B-shaped Llama's tokens/s, MFU and LongRecipe-vs-full
#      step at 16k and 32k, and the longest sample an 8B-shaped Llama trains on one GPU,
#   5. issue 15's scale checks (bench/bench_gpu_analyze.py): the analyze stage on a 1B-shaped
#      Llama at 16k and 32k (tokens/s, MFU, stage vs bare forward) and evaluation prefill
#      at 32k; the gpu tests include the stages on an indexed GPU (cuda:N).
# CHECKS selects them (default all: study,tests,bench,train,scale); each has its own
# timeout so that `CHECKS=tests,scale` fits in 10 minutes.
# Wheels in .whl/ (what the machine lacks) are installed into /tmp/site first. The study's
# prepared inputs (tokenizer, corpora as .jsonl.xz) may be carried in
# studies/extension/runs-gpu/; whatever is missing is prepared there.
# Results go to $OUT (default /tmp/gpu-out), at most ten files.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
STUDY_TIMEOUT=${STUDY_TIMEOUT:-380}
CHECKS=${CHECKS:-study,tests,bench,train,scale}
want() { case ",$CHECKS," in *",$1,"*) return 0;; *) return 1;; esac; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

if want study; then
for f in studies/extension/runs-gpu/corpus/*.xz; do
  [ -e "$f" ] && [ ! -e "${f%.xz}" ] && python3 -c \
    "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[1][:-3], 'wb'))" "$f"
done
if ! timeout "$STUDY_TIMEOUT" python3 studies/extension/run.py --scale gpu --engine library \
    --no-gate 2>&1 | tee "$OUT/study.txt"; then
  # cut short: summarize whatever comparison finished (the store keeps every stage)
  python3 studies/extension/summarize.py --store studies/extension/runs-gpu/store \
    --out studies/extension/results-gpu --scale gpu >/dev/null 2>&1
fi
for f in results.md results.json niah_accuracy.png perplexity.png; do
  cp "studies/extension/results-gpu/$f" "$OUT/" 2>/dev/null
done
fi

want tests && timeout 90 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.txt"
want bench && timeout 100 python3 bench/bench_train.py --device cuda --d 1024 --layers 8 --heads 8 \
  --target 16384 --fraction 0.3 --steps 3 --repeats 2 --overhead-len 4096 --overhead-steps 10 \
  2>&1 | tee "$OUT/bench_train.txt"
if want train; then
  { timeout 90 python3 bench/bench_gpu_train.py --parts correctness
    timeout 150 python3 bench/bench_gpu_train.py --parts throughput
    timeout 300 python3 bench/bench_gpu_train.py --parts length
  } 2>&1 | grep -v Warning | tee "$OUT/bench_gpu_train.txt"
fi
want scale && timeout 300 python3 bench/bench_gpu_analyze.py 2>&1 | grep -v Warning \
  | tee "$OUT/bench_gpu_analyze.txt"
