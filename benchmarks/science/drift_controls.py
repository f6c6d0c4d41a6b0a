"""The drift instruments' controls on the embedded SmolLM2-135M (issue 25): does the register
shift see a known register change, and stay blind to a resample of the base?

    python benchmarks/science/drift_controls.py [--n 64] [--tokens 48] [--device cpu] [--out FILE]

Pre-registered reading (written before the first run): the instrument is usable when the positive
control (the base under a press-release system prompt against the base) reaches AUC >= 0.8 and
the negative control (the base against itself, another seed) stays <= 0.6, at the loop's sampling
(temperature 1, top-p 1) and the full preset's size (64 prompts, 48 tokens). The quick preset's
size (32 prompts, 32 tokens) is measured too; if it fails there, the quick preset's drift line is
read as failed, not as a null. NeutralKL of the base against itself must be exactly 0.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from steer_heal.data import load_neutral_prompts
from steer_heal.evaluate import NeutralDrift
from steer_heal.evaluate.judge import Embedder
from steer_heal.healing import History
from steer_heal.models import load_model
from steer_heal.run.config import RunConfig
from steer_heal.steering import generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64x48,32x32", help="prompts x tokens, comma-separated")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m", device=args.device)
    embed = Embedder()
    results = []
    for size in args.sizes.split(","):
        n, tokens = (int(x) for x in size.split("x"))
        prompts = load_neutral_prompts()[:n]
        sampling = replace(RunConfig().generate, max_new_tokens=tokens)
        started = time.perf_counter()
        with History(model) as hist:
            with hist.base():
                base = generate(model, tok, prompts, sampling=sampling, seed=args.seed * 1000 + 990, progress=False)
            drift = NeutralDrift(prompts, base, hist.base, embed, sampling, args.seed * 1000 + 991)
            controls = drift.controls(model, tok)
            itself = drift(model, tok)
        row = {
            "prompts": n,
            "tokens": tokens,
            **controls.to_dict(),
            "self_auc": itself.metrics["auc"],
            "self_kl_rev": itself.metrics["kl_rev"],
            "base_ppl": itself.metrics["base_base_ppl"],
            "seconds": time.perf_counter() - started,
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
