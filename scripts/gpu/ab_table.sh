#!/usr/bin/env bash
# A/B of two tuning tables for one kernel on the GPU, in one call, alternating rounds (a table entry is shipped only
# when it wins here, not on the tuner's own timing alone). From the repository root:
#   bash scripts/gpu/ab_table.sh <shipped table path> <candidate table path> <rounds> <bench command...>
# e.g. bash scripts/gpu/ab_table.sh src/tilestack/tune/tables/attention_fwd_sm90-132sm-227kb_nvidia-h100-80gb-hbm3.json \
#        /tmp/new.json 2 python3 scripts/bench_attention.py --seqs 4096 8192 16384 --dims 64 --causal yes
# Each round runs the bench once with the shipped table ("old") and once with the candidate ("new") copied over it,
# each with an empty tilestack cache (so no tuned config of an earlier run is read); the shipped file is restored.
set -u
table=$1 candidate=$2 rounds=$3; shift 3
export PYTHONPATH=src PYTHONUNBUFFERED=1
saved=$(mktemp); cp "$table" "$saved"
trap 'cp "$saved" "$table"' EXIT
nvidia-smi --query-gpu=name --format=csv,noheader
for r in $(seq "$rounds"); do
  for v in old new; do
    if [ "$v" = old ]; then cp "$saved" "$table"; else cp "$candidate" "$table"; fi
    TILESTACK_CACHE_DIR=$(mktemp -d) && export TILESTACK_CACHE_DIR
    echo "### round $r table $v"
    "$@"
  done
done
