#!/usr/bin/env bash
# Issue 26's `run.compiled = auto` rule, measured: the loop at the 4B shape for two rounds in one
# process each, on one GPU, one process after the other: eager; compiled with an empty compile
# cache (cold); compiled again with the cache the cold process left (warm). Each writes
# OUT/round_4b_compiled_<mode>_<tag>.json as it ends, so a cut call keeps what finished.
#
#   bash benchmarks/gpu/gpu_auto_rule.sh OUT [SHAPE]
#
# Pre-registered reading (written before the run): with R the rounds of a run, eager's and the
# warm process's rounds give E(R) = e0 + (R-1) e1 and C(R) = w0 + (R-1) w1 (round 0 and round 1
# seconds). `auto` picks compiled on CUDA at this shape if C(5) < 0.9 E(5) (the full preset's five
# rounds, a 10 % margin for the spread between processes) and C(1) < E(1) x 1.1 (a one-round run
# must not lose more than 10 %); else auto stays eager at this shape. A cold process is reported,
# never used for the rule (the compile cache makes it a once-per-machine cost).
set -euo pipefail
out=$1 shape=${2:-4b}
mkdir -p "$out"
export STEER_HEAL_CACHE=$(mktemp -d)/steer-heal PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/card.txt"
for mode in "false _eager" "true _cold" "true _warm"; do
  set -- $mode
  start=$(date +%s)
  PYTHONPATH=. python3 benchmarks/gpu/gpu_round_4b.py --shape "$shape" --compiled "$1" --rounds 2 --tag "$2" --out "$out" \
    > "$out/log$2.txt" 2>&1 || echo "exit $? for $2" >> "$out/log$2.txt"
  rm -rf "$out/runs$2"  # the run folders (events of random text) are not needed back
  echo "$2: $(( $(date +%s) - start )) s wall; cache $(du -sh "$STEER_HEAL_CACHE" 2>/dev/null | cut -f1)" | tee -a "$out/walls.txt"
done
rm -rf "$(dirname "$STEER_HEAL_CACHE")"
