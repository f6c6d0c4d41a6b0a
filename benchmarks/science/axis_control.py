"""Does an axis's answer log-odds probe pass its positive control? Per crossed pair, on two scenario sets.

    python benchmarks/science/axis_control.py AXIS [AXIS.toml ...] [--out FILE.json]

The control (issue 25, item 4): the stance part S of the crossed answer log-odds probe
(`steer_heal/evaluate/logodds.py`) must move in the pos direction when the base model is
prompted with the pos persona instead of the neg persona, by >= 5 standard errors of the
paired per-scenario difference. Without it a stance number from the probe may be the
vector's wording or an artefact of the answer pairs (docs/results.md: on authority the
persona prompts move S by -0.305, z -4.6, the wrong way).

Rules, written before the first candidate was scored (2026-12-07):
- Candidate answer pairs are written and revised by reading **dev** scores only: the
  axis's own generation prompts that are scenarios (the `prompts` pool), never the
  held-out `eval_prompts`.
- A candidate is adopted when, on dev, the pos-minus-neg persona stance shift is > 0 with
  z >= 5. Its held-out number (`eval_prompts`, 32 scenarios) is then read once and is the
  one reported; it must also be > 0 with z >= 5, else the candidate fails and is listed as
  such in docs/results.md with every earlier attempt (this script's JSON keeps them all).
- Per-pair numbers are printed so a pair that moves the wrong way is visible, but a set is
  judged whole (no pair is dropped after reading held-out numbers).

SmolLM2-135M-Instruct on the CPU, fp32: a few minutes per candidate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from steer_heal import load_model
from steer_heal.data import load_axis
from steer_heal.evaluate import AnswerLogOdds


def control(probe: AnswerLogOdds, model, tok, pos: str, neg: str) -> dict:
    """The pos-minus-neg persona shift of S, for the whole set and per pair (paired over scenarios)."""
    scores = {name: replace(probe, system=system).score(model, tok) for name, system in (("pos", pos), ("neg", neg))}

    def stance(table: dict, pair) -> np.ndarray:  # S_k per scenario, from summed log-probs
        lp = {a: table[a][:, 0] for a in pair.answers()}
        return ((lp[pair.pos] - lp[pair.neg]) + (lp[pair.pos_in_neg_words] - lp[pair.neg_in_pos_words])) / 2

    per_pair = []
    for k, pair in enumerate(probe.pairs):
        diff = stance(scores["pos"], pair) - stance(scores["neg"], pair)
        se = float(diff.std(ddof=1) / math.sqrt(len(diff)))
        per_pair.append(
            {
                "pair": k,
                "pos": pair.pos,
                "mean": float(diff.mean()),
                "se": se,
                "z": float(diff.mean()) / se,
                "diff": diff,
            }
        )
    # the set's S is the mean over pairs, so its shift is the mean of the per-pair differences
    diff = np.mean([p.pop("diff") for p in per_pair], axis=0)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff)))
    return {"mean": float(diff.mean()), "se": se, "z": float(diff.mean()) / se, "n": len(diff), "pairs": per_pair}


def passes(c: dict) -> bool:
    return c["mean"] > 0 and math.isfinite(c["z"]) and c["z"] >= 5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("axes", nargs="+", help="bundled axis names or axis TOML files (candidates)")
    parser.add_argument("--held-out", action="store_true", help="also score eval_prompts (only for an adopted set)")
    parser.add_argument("--out", type=Path, default=None, help="append the results to this JSON list")
    args = parser.parse_args()
    model, tok = load_model("smollm2-135m", device="cpu")
    records = json.loads(args.out.read_text()) if args.out and args.out.exists() else []
    for name in args.axes:
        axis = load_axis(name)
        dev = [p for p in axis.prompts if p.endswith("?") and "What should I" in p] or axis.prompts
        probe = AnswerLogOdds.from_axis(axis, batch_size=32)
        t0 = time.perf_counter()
        record = {"axis": name, "persona": {"pos": axis.pos, "neg": axis.neg}, "answers": axis.answers}
        record["dev"] = control(replace(probe, scenarios=dev), model, tok, axis.pos, axis.neg)
        if args.held_out:
            record["held_out"] = control(probe, model, tok, axis.pos, axis.neg)
        record["seconds"] = time.perf_counter() - t0
        records.append(record)
        for split in ("dev", "held_out"):
            if split not in record:
                continue
            c = record[split]
            verdict = "PASSES" if passes(c) else "fails"
            print(
                f"{name} {split} ({c['n']} scenarios): S {c['mean']:+.3f} (SE {c['se']:.3f}, z {c['z']:+.1f}) {verdict}"
            )
            for p in c["pairs"]:
                print(f"    pair {p['pair']}: {p['mean']:+.3f} (z {p['z']:+.1f})  {p['pos'][:70]}")
        sys.stdout.flush()
    if args.out:
        args.out.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
