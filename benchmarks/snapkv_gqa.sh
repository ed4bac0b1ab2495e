#!/usr/bin/env bash
# Issue 21, item 7: SnapKV / PyramidKV on SmolLM2-135M's needles (9 query heads, 3 KV heads):
# grouped (heads=kv, the default) vs per-query-head (heads=query, the official code's rule),
# the class defaults (window 64, kernel 5, avg) vs the paper's LongBench settings (preset=longbench),
# and per-query-head at the grouped run's cache memory (keep / 3). Rows go to
# benchmarks/results/snapkv_gqa.jsonl as they finish (a rerun skips the rows already there), in
# priority order, one task at a time (TASKS; default the 1k needles, 10 prompts).
# The table:
#   PYTHONPATH=src python benchmarks/kv_sweep.py --role needles --quality benchmarks/results/snapkv_gqa.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-benchmarks/results/snapkv_gqa.jsonl}
TASKS=${TASKS:-needle-1k}
run() { PYTHONPATH=src "$PY" benchmarks/kv_sweep.py --threads 1 --out "$OUT" --tasks $TASKS "$@"; }

for t in $TASKS; do
  TASKS=$t
  run --methods snapkv:heads=query snapkv:preset=longbench --keeps 0.5
  run --methods snapkv:heads=query --keeps 0.1667  # the cache memory of grouped at 0.5
  run --methods pyramidkv:heads=query snapkv:heads=query,preset=longbench --keeps 0.5
  run --methods snapkv:heads=query snapkv:preset=longbench --keeps 0.25
  run --methods snapkv:window=32 snapkv:pooling=max,kernel=7 snapkv --keeps 0.5
done
