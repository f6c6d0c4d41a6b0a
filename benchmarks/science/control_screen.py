"""Which known register makes the register shift's positive control robust? (issue 25)

    python benchmarks/science/control_screen.py [--seeds 0,1] [--confirm 2] [--out FILE]

The positive control so far (the base under a five-year-old system prompt) read AUC 0.83,
0.83 and 0.87 on three GPU seeds and 0.79 on the CPU at the loop's size (64 neutral prompts,
48 tokens): it passes the 0.8 bar by a margin smaller than its seed-to-seed spread, so a test
that asserts it would fail on some CPUs (sampled tokens differ with the float rounding) and a
user's run prints FAILED by chance. A control exists to show the instrument can see a register
change when there is one; it should pass with margin.

Pre-registered rule, written 2026-12-07 before any candidate below was read:
- Candidates (English, on-topic answers; no other language, no emoji or formatting-only change,
  which would show only that MiniLM sees characters): the five-year-old (current), a pirate,
  Shakespearean English, an overexcited sports commentator, and one short sentence of at most
  ten words (a terse register).
- Each is read at the loop's size (the first 64 neutral prompts, 48 tokens, the loop's sampling)
  on the CPU, against the same base samples, with sampling seeds 0 and 1 (dev).
- The new control is the candidate with the highest minimum AUC over the two dev seeds; a tie
  within 0.01 keeps the current one. Adopted only if that minimum is >= 0.9.
- Then read once on seed 2 (held out): it must be >= 0.8 there too (and the negative control,
  the base against itself, <= 0.6), else the screen failed and the control stays as it is.
The five-year-old stays in the report as a sensitivity reference (a milder register change).

Stage 1 result (2026-12-07, CPU, `--out docs/runs/science/control_screen/screen.json`): no
candidate's dev minimum reached 0.9 (five-year-old 0.822, pirate 0.844, Shakespeare 0.805,
commentator 0.759, terse 0.521); the five-year-old read 0.806 on the held-out seed: screen failed,
the control stays. Re-reading the stored GPU runs' controls with other classifiers (L2 0.01-10,
nearest centroid, shrunk LDA) moved the positive control by at most 0.03: the classifier is not
the limit, the text is.

Stage 2, written after stage 1 and before its run: the same rule with more text per sample,
`--tokens 96 --candidates five_year_old,pirate` (dev seeds 0, 1; held-out seed 2). If it passes,
the full preset's drift instruments read 96 tokens (their controls with them) and the stored
48-token drift numbers stay as they are, labelled with their size.

Stage 2 result (2026-12-07, CPU, `docs/runs/science/control_screen/screen_96.json`): dev minimum
five-year-old 0.818, pirate 0.867; none >= 0.9, the five-year-old read 0.792 on the held-out
seed: failed; the instruments stay at 48 tokens and the control stays the five-year-old.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from steer_heal.data import load_neutral_prompts
from steer_heal.evaluate.drift import register_shift
from steer_heal.evaluate.judge import Embedder
from steer_heal.models import load_model
from steer_heal.run.config import RunConfig
from steer_heal.steering import generate

CANDIDATES = {
    "five_year_old": "You are a five-year-old child. Answer in very short, simple baby talk.",
    "pirate": "You are a pirate. Answer every question in pirate speak, with plenty of 'arr' and 'matey'.",
    "shakespeare": "You are William Shakespeare. Answer in old-fashioned Elizabethan English, with thee, thou and thy.",
    "commentator": "You are an overexcited sports commentator. Answer everything as breathless live commentary "
    "full of exclamation marks.",
    "terse": "Answer in one short sentence of no more than ten words.",
}
CURRENT = "five_year_old"


def read(model, tok, embed, prompts, sampling, base_texts, system, seed) -> tuple[float, list[str]]:
    made = generate(model, tok, prompts, sampling=sampling, seed=seed, system=system, progress=False)
    texts = [c.text for c in made]
    return register_shift(embed, texts, base_texts, seed=seed)["auc"], texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--confirm", type=int, default=2)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m", device="cpu")
    embed = Embedder()
    prompts = load_neutral_prompts()[: args.n]
    sampling = replace(RunConfig().generate, max_new_tokens=args.tokens, batch_size=64)
    started = time.perf_counter()
    base = [c.text for c in generate(model, tok, prompts, sampling=sampling, seed=990, progress=False)]
    result: dict = {"prompts": args.n, "tokens": args.tokens, "dev": {}, "texts": {}}
    for name in args.candidates.split(","):
        system = CANDIDATES[name]
        for seed in (int(s) for s in args.seeds.split(",")):
            auc, texts = read(model, tok, embed, prompts, sampling, base, system, seed)
            result["dev"].setdefault(name, {})[seed] = auc
            result["texts"][f"{name}_s{seed}"] = texts[:8]
            print(f"{name} seed {seed}: AUC {auc:.3f}", flush=True)
    worst = {name: min(by_seed.values()) for name, by_seed in result["dev"].items()}
    best = max(worst, key=worst.get)
    if worst[best] - worst[CURRENT] <= 0.01:
        best = CURRENT
    result["worst_dev"] = worst
    result["chosen"] = best if worst[best] >= 0.9 else CURRENT
    result["adopted_by_dev"] = worst[best] >= 0.9
    chosen = CANDIDATES[result["chosen"]]
    held_out, texts = read(model, tok, embed, prompts, sampling, base, chosen, args.confirm)
    negative, _ = read(model, tok, embed, prompts, sampling, base, None, args.confirm)
    result["held_out"] = {"seed": args.confirm, "positive_auc": held_out, "negative_auc": negative}
    result["passed"] = result["adopted_by_dev"] and held_out >= 0.8 and negative <= 0.6
    result["seconds"] = time.perf_counter() - started
    print(json.dumps({k: v for k, v in result.items() if k != "texts"}, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
