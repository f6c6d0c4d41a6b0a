"""Filter sweep on the embedded SmolLM2-135M: tail perplexity and kept fraction per dose,
and the wall time of the batched perplexity filter. A script, not a test.

    python benchmarks/science/filter_sweep.py --threads 2 --out sweep.json [--unbatched] [--walk]

1. Extract the care-vs-authority persona vector (bundled contexts, 64 of them, layers at
   45%-55% of depth).
2. Sample `--n` completions of up to `--tokens` tokens at each coefficient (rotating
   through the bundled authority prompt pool).
3. Score all of them at once with `default_filter(model, tok)` (perplexity under the
   unsteered model: generation steers only inside `generate`) and print the FilterReport.
4. Time the perplexity filter alone on the same completions (4 x 16 = 64 by default);
   `--unbatched` also times batch_size=1 on them (the per-completion loop it replaces).
5. `--walk`: a short `walk_dose` run with the default filter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from steer_heal import SteeringVector, generate, load_model
from steer_heal.data import load_axis, load_contexts
from steer_heal.filters import FilterReport, Perplexity, default_filter
from steer_heal.filters.dose import walk_dose
from steer_heal.sampling import Sampling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coeffs", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--n", type=int, default=16, help="completions per coefficient")
    ap.add_argument("--tokens", type=int, default=128, help="max new tokens per completion")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unbatched", action="store_true", help="also time the filter one completion at a time")
    ap.add_argument("--walk", action="store_true", help="also run a short walk_dose")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    record: dict = {"threads": args.threads, "loadavg_start": os.getloadavg()}

    model, tok = load_model("smollm2-135m")
    axis = load_axis("authority")
    contexts = load_contexts()[::5][:64]  # every 5th bundled context: 64 spread over all topics
    t0 = time.perf_counter()
    vec = SteeringVector.from_persona_pair(
        model, tok, pos=axis.pos, neg=axis.neg, contexts=contexts, layers=(0.45, 0.55)
    )
    record["extract_s"] = time.perf_counter() - t0
    record["vector_norms"] = {str(k): v for k, v in vec.norms().items()}
    print(
        f"vector: layers {vec.layers}, norms {[round(v, 2) for v in vec.norms().values()]}, "
        f"{len(contexts)} contexts, {record['extract_s']:.1f} s"
    )

    completions = []
    for i, coeff in enumerate(args.coeffs):
        prompts = [axis.prompts[(i * args.n + j) % len(axis.prompts)] for j in range(args.n)]
        t0 = time.perf_counter()
        completions += generate(
            model,
            tok,
            prompts,
            steering=vec,
            coeff=coeff,
            seed=args.seed + 100 * i,
            progress=False,
            sampling=Sampling(max_new_tokens=args.tokens, do_sample=True, batch_size=args.batch_size),
        )
        print(f"generated {args.n} at c={coeff:g} in {time.perf_counter() - t0:.1f} s", flush=True)
    lengths = [len(c.token_ids) for c in completions]
    record["completion_tokens"] = {"mean": statistics.fmean(lengths), "min": min(lengths), "max": max(lengths)}

    t0 = time.perf_counter()
    verdicts = default_filter(model, tok, batch_size=8)(completions)
    record["default_filter_s"] = time.perf_counter() - t0
    report = FilterReport.from_verdicts(completions, verdicts)
    record["report"] = report.to_dict()
    print(report.table(samples=True))

    ppl = Perplexity(model, tok, batch_size=8)
    t0 = time.perf_counter()
    ppl(completions)
    record["ppl_filter_s"] = time.perf_counter() - t0
    print(
        f"\nperplexity filter: {len(completions)} completions ({statistics.fmean(lengths):.0f} tokens on average, "
        f"min {min(lengths)}, max {max(lengths)}) in {record['ppl_filter_s']:.1f} s, batch 8, "
        f"{args.threads} threads; whole default filter {record['default_filter_s']:.1f} s"
    )
    if args.unbatched:
        t0 = time.perf_counter()
        Perplexity(model, tok, batch_size=1)(completions)
        record["ppl_filter_unbatched_s"] = time.perf_counter() - t0
        print(f"same, one completion per forward: {record['ppl_filter_unbatched_s']:.1f} s")

    if args.walk:
        t0 = time.perf_counter()
        dose = walk_dose(
            model,
            tok,
            vec,
            axis.prompts,
            default_filter(model, tok),
            c_min=1.0,
            c_max=16.0,
            steps=3,
            probe_size=8,
            seed=args.seed,
            sampling=Sampling(do_sample=True, max_new_tokens=64, batch_size=8),
        )
        record["walk_s"] = time.perf_counter() - t0
        record["walk"] = dose.to_dict()
        print(f"\nwalk_dose ({record['walk_s']:.0f} s):\n{dose.table()}")
    record["loadavg_end"] = os.getloadavg()
    print(f"load average start {record['loadavg_start']}, end {record['loadavg_end']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1, allow_nan=False)


if __name__ == "__main__":
    main()
