#!/usr/bin/env bash
# Issue 21, item 7: SnapKV / PyramidKV on SmolLM2-135M's needles (9 query heads, 3 KV heads):
# grouped (heads=kv, the default) vs per-query-head (heads=query, the official code's rule), the
# class defaults (window 64, kernel 5, avg) vs the paper's LongBench settings (preset=longbench),
# one setting at a time, and per-query-head at the grouped run's cache memory (keep 0.5 / 3).
# Needles of 1k tokens (10 prompts), the main rows also at 2k (10 prompts). Rows go to
# benchmarks/results/snapkv_gqa.jsonl as they finish (a rerun skips the rows already there; the
# dense rows there are the issue-6 sweep's). About 5 min a row at 1k, 10 at 2k, on 1 busy CPU thread.
# The table (H2O and the grouped defaults' other cells from kv_sweep.jsonl, marked †):
#   PYTHONPATH=src python benchmarks/kv_sweep.py --role needles --quality benchmarks/results/snapkv_gqa.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-benchmarks/results/snapkv_gqa.jsonl}
run() { PYTHONPATH=src "$PY" benchmarks/kv_sweep.py --threads 1 --out "$OUT" "$@"; }

run --tasks needle-1k --keeps 0.5 --methods snapkv snapkv:heads=query snapkv:preset=longbench \
  snapkv:heads=query,preset=longbench pyramidkv:heads=query pyramidkv:preset=longbench \
  snapkv:window=32 snapkv:kernel=7 snapkv:pooling=max snapkv:pooling=max,kernel=7
run --tasks needle-1k --keeps 0.1667 --methods snapkv:heads=query  # the cache memory of grouped at 0.5
run --tasks needle-1k --keeps 0.25 --methods snapkv:heads=query snapkv:preset=longbench
run --tasks needle-2k --keeps 0.5 --methods snapkv:heads=query snapkv:preset=longbench \
  pyramidkv:preset=longbench snapkv:pooling=max,kernel=7
# where the key goes: share of (layer, query head) pairs whose cache still holds the key (prefill only)
run --role needle-kept --tasks needle-1k --keeps 0.5 --out benchmarks/results/snapkv_gqa_kept.jsonl \
  --methods snapkv snapkv:heads=query snapkv:preset=longbench h2o
