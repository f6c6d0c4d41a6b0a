"""Precision and recall of "keep" on the hand-labelled set (tests/data/filter_labels.jsonl).

    python benchmarks/filter_labels.py            # text-only default filters
    python benchmarks/filter_labels.py --ppl      # + tail perplexity under SmolLM2-135M

Prints the totals, the totals without the babble category, every disagreement with the
labels, the tail ppl per category, and the same totals on the holdout set
(tests/data/filter_labels_holdout.jsonl, written before the babble rules were scored on it).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from steer_heal.filters import PPL, default_filter, default_text_filter
from steer_heal.generate import Completion

LABELS = Path(__file__).resolve().parent.parent / "tests" / "data" / "filter_labels.jsonl"


def precision_recall(pairs) -> str:
    tp = sum(v.keep and r["label"] == "keep" for r, v in pairs)
    fp = sum(v.keep and r["label"] == "drop" for r, v in pairs)
    fn = sum(not v.keep and r["label"] == "keep" for r, v in pairs)
    return f"precision {tp / max(tp + fp, 1):.3f} ({tp}/{tp + fp}), recall {tp / max(tp + fn, 1):.3f} ({tp}/{tp + fn})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppl", action="store_true")
    ap.add_argument("--tau", type=float, default=50.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in LABELS.read_text().splitlines() if line.strip()]
    completions = [Completion(r["prompt"], r["text"], (), 1.0, "length") for r in rows]
    if args.ppl:
        from steer_heal import load_model

        model, tok = load_model("smollm2-135m")
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
    if args.ppl:
        for cat in sorted({r["category"] for r in rows}):
            ppls = sorted(v.scores[PPL] for r, v in pairs if r["category"] == cat)
            print(f"  tail ppl {cat:9} median {statistics.median(ppls):7.1f}  range {ppls[0]:.1f} .. {ppls[-1]:.1f}")


if __name__ == "__main__":
    main()
