"""Precision and recall of "keep" on the hand-labelled set (tests/data/filter_labels.jsonl).

    python benchmarks/science/filter_labels.py               # text-only default filters
    python benchmarks/science/filter_labels.py --ppl         # + tail perplexity under SmolLM2-135M (absolute tau)
    python benchmarks/science/filter_labels.py --calibrated  # + the calibrated model-based filter (what the loop uses)

Prints the totals, the totals without the babble category, every disagreement with the
labels, the tail ppl per category, and the same totals on the holdout set
(tests/data/filter_labels_holdout.jsonl, written before the babble rules were scored on it).
Two sets: the hand-written tests/data/filter_labels.jsonl (57 items) and
tests/data/filter_labels_smollm2.jsonl (48 real SmolLM2-135M completions of the authority
pool: 24 sampled at c = 0 and 1, labelled by reading them, and 24 word salad at c = 6 and 8).
The calibrated filter is calibrated on 16 unsteered SmolLM2 completions of the authority
pool (prompts the labelled completions do not use).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from steer_heal.filters import PPL, default_filter, default_text_filter
from steer_heal.steering.generation import Completion

LABELS = Path(__file__).resolve().parents[2] / "tests" / "data" / "filter_labels.jsonl"
REAL_SALAD = LABELS.with_name("filter_labels_smollm2.jsonl")


def labelled_rows(path: Path = LABELS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def calibrated_smollm2_filter(model, tok, seed: int = 0):
    """The loop's filter on SmolLM2: calibrated on 16 unsteered completions of the authority pool."""
    from steer_heal.data import load_axis
    from steer_heal.filters import calibrate_on_pool
    from steer_heal.sampling import Sampling

    axis = load_axis("authority")
    sampling = Sampling(max_new_tokens=96, do_sample=True, batch_size=16)
    return calibrate_on_pool(model, tok, axis.prompts, n=16, sampling=sampling, seed=seed)


def precision_recall(pairs) -> str:
    tp = sum(v.keep and r["label"] == "keep" for r, v in pairs)
    fp = sum(v.keep and r["label"] == "drop" for r, v in pairs)
    fn = sum(not v.keep and r["label"] == "keep" for r, v in pairs)
    return f"precision {tp / max(tp + fp, 1):.3f} ({tp}/{tp + fp}), recall {tp / max(tp + fn, 1):.3f} ({tp}/{tp + fn})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppl", action="store_true")
    ap.add_argument("--calibrated", action="store_true")
    ap.add_argument("--tau", type=float, default=50.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = labelled_rows()
    real = labelled_rows(REAL_SALAD)
    completions = [Completion(r["prompt"], r["text"], (), 1.0, "length") for r in rows]
    if args.ppl or args.calibrated:
        from steer_heal import load_model

        model, tok = load_model("smollm2-135m")
    if args.calibrated:
        flt, calibration = calibrated_smollm2_filter(model, tok)
        print(calibration.describe())
    elif args.ppl:
        flt = default_filter(model, tok, tau=args.tau)
    else:
        flt = default_text_filter()
    verdicts = flt(completions)
    pairs = list(zip(rows, verdicts))
    print(f"{flt!r} on {len(rows)} items")
    print("all:          ", precision_recall(pairs))
    print("not babble:   ", precision_recall([(r, v) for r, v in pairs if r["category"] != "babble"]))
    for r, v in pairs:
        if v.keep != (r["label"] == "keep"):
            print(
                f"  {r['category']:9} labelled {r['label']}, got {'keep' if v.keep else 'drop'} {v.reasons}: {r['text'][:70]!r}"
            )
    holdout = [
        json.loads(line) for line in LABELS.with_name("filter_labels_holdout.jsonl").read_text().splitlines() if line
    ]
    held = list(zip(holdout, flt([Completion(r["prompt"], r["text"], (), 1.0, "length") for r in holdout])))
    print(f"holdout ({len(holdout)}):", precision_recall(held))
    judged = list(zip(real, flt([Completion(r["prompt"], r["text"], (), 1.0, "length") for r in real])))
    print(f"real SmolLM2 completions ({len(real)}):", precision_recall(judged))
    for r, v in judged:
        if v.keep != (r["label"] == "keep"):
            print(
                f"  {r['category']:9} labelled {r['label']}, got {'keep' if v.keep else 'drop'} {v.reasons}: {r['text'][:70]!r}"
            )
    if args.ppl or args.calibrated:
        for cat in sorted({r["category"] for r in rows}):
            ppls = sorted(v.scores[PPL] for r, v in pairs if r["category"] == cat)
            print(f"  tail ppl {cat:9} median {statistics.median(ppls):7.1f}  range {ppls[0]:.1f} .. {ppls[-1]:.1f}")


if __name__ == "__main__":
    main()
