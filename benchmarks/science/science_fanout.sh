#!/usr/bin/env bash
# The loop phase of benchmarks/science/science.py for every axis x seed x regulariser at once, one process each,
# dealt round-robin over the visible GPUs (a SmolLM2 round is host-bound, so GPUs take several).
#
#   bash benchmarks/science/science_fanout.sh OUT "love authority" "0 1 2" "klrev nll" SECONDS [science.py options]
#
# Each process runs under `timeout SECONDS` and writes OUT/<axis>_<reg>_s<seed>/ (loop.json, runs/) and
# OUT/<axis>_<reg>_s<seed>.log, with THREADS (default 2) CPU threads each. A process cut by the timeout
# leaves its finished stages in its events.
set -u
out=$1 axes=$2 seeds=$3 regs=$4 seconds=$5
shift 5
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
mkdir -p "$out"
i=0
for axis in $axes; do
  for seed in $seeds; do
    for reg in $regs; do
      name=${axis}_${reg}_s${seed}
      gpu=$((i % (gpus > 0 ? gpus : 1)))
      OMP_NUM_THREADS=${THREADS:-2} CUDA_VISIBLE_DEVICES=$gpu timeout "$seconds" python3 benchmarks/science/science.py loop --axis "$axis" \
        --seeds "$seed" --regs "$reg" --out "$out/$name" --state "$out/$name" --budget 100000 "$@" \
        >"$out/$name.log" 2>&1 &
      i=$((i + 1))
    done
  done
done
wait
for log in "$out"/*.log; do echo "$log: $(tail -n 1 "$log")"; done
