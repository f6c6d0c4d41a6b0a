#!/usr/bin/env bash
# Two code trees side by side on one GPU (docs/benchmarks.md, "the heal on a GPU"): the heal at the
# full preset's size on a random SmolLM2-shape model (`benchmarks/heal_frozen.py`), and the loop's
# SmolLM2-shape round (`gpu_round_4b.py --shape smollm2 --rounds 2`). BEFORE is a folder holding an
# older `steer_heal/` package (e.g. `git archive <rev> steer_heal | tar -x -C BEFORE`); the
# working tree is "after". One process per tree and repeat, alternating before, after, before,
# after, so a drift of the machine's speed falls on both.
#
#   bash benchmarks/gpu/gpu_heal_ab.sh BEFORE OUT [heal|round|both] [HEAL_PAIRS, default 2]
#
# Pre-registered readings (written before the run): heal_frozen.py's docstring (after / before
# below 0.95 with no overlap of the two trees' heals: a gain; joint / apart below 0.95:
# `joint_anchor` defaults to auto); for the round, the same 0.95 on round 1
# (the steady state, a folded round present) and on the heal stage within it.
set -uo pipefail
before=$1 out=$2 what=${3:-both} pairs=${4:-2}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch; print(torch.__version__)"; } \
  > "$out/card.txt"
tree() { if [ "$1" = before ]; then echo "$before"; else echo .; fi; }
if [ "$what" != round ]; then
  for i in $(seq 0 $((pairs - 1))); do
    for t in before after; do
      arms=kept,recomputed
      [ "$t" = after ] && arms=kept,joint,apart,recomputed
      start=$(date +%s)
      PYTHONPATH=$(tree $t) timeout 240 python3 benchmarks/heal_frozen.py --shape smollm2 --device cuda --arms "$arms" \
        --repeats 1 --label "$t" --out "$out/heal_${t}_$i.json" > "$out/heal_${t}_$i.log" 2>&1
      echo "heal $t $i: rc $? $(( $(date +%s) - start )) s wall" | tee -a "$out/walls.txt"
    done
  done
fi
if [ "$what" != heal ]; then
  for t in before after; do
    start=$(date +%s)
    PYTHONPATH=$(tree $t) timeout 280 python3 benchmarks/gpu/gpu_round_4b.py --shape smollm2 --rounds 2 --tag "_$t" \
      --out /tmp/gpu_heal_ab > "$out/round_$t.log" 2>&1
    echo "round $t: rc $? $(( $(date +%s) - start )) s wall" | tee -a "$out/walls.txt"
    cp /tmp/gpu_heal_ab/round_smollm2_compiled_false_"$t".json "$out/" 2>/dev/null
  done
fi
