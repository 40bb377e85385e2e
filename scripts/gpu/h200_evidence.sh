#!/usr/bin/env bash
# One call on the H200 that produces the evidence for issues 8 and 9, each part bounded in time, every result
# under $OUT (at most 8 files come back: logs are concatenated). Run from the repository root:
#   bash scripts/gpu/h200_evidence.sh            (PYTHONPATH=src is set here)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src
OUT=${OUT:-out/h200}
mkdir -p "$OUT"
log="$OUT/log.txt"
part() {   # part <seconds> <name> <command...>
  local s=$1 name=$2; shift 2
  echo "=== $name" | tee -a "$log"
  timeout "$s" "$@" >>"$log" 2>&1; echo "=== $name rc=$?" | tee -a "$log"
}
part 80 host-cost python3 scripts/bench_host_cost.py --json "$OUT/host.json"
part 120 gpt2-eager python3 scripts/bench_model_step.py --models gpt2 --modes eager --json "$OUT/gpt2_eager.json"
part 70 llama-eager python3 scripts/bench_model_step.py --models llama --modes eager --no-profile --json "$OUT/llama_eager.json"
part 110 fa3-grid python3 scripts/bench_attention.py --backward --seqs 1024 4096 16384 --out "$OUT"
part 70 bench python3 -m tilestack.cli bench --no-models --out "$OUT/bench"
[ -n "${FUZZ_S:-}" ] && part "$FUZZ_S" fuzz python3 scripts/fuzz.py --budget 10000 --device cuda --time-limit "$((FUZZ_S - 10))" --json "$OUT/fuzz.json"
tar czf "$OUT/bench.tgz" -C "$OUT" bench 2>/dev/null && rm -rf "$OUT/bench"
grep -E "us/call|vs SDPA|^attention\(|^gemm|^softmax|^layer|cuda_graph|bar|MISS|PASS| eager |fwd D=|bwd D=|problems|mismatch|===" "$log" | cut -c1-220 | tail -120
