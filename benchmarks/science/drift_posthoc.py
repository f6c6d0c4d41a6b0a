"""Re-read the register shift of finished runs from their events, with the current instrument.

    python benchmarks/science/drift_posthoc.py RUN_DIR... [--json OUT]

Every run logs the base's neutral samples (the `neutral` event) and, after each heal, the student's
samples of the same prompts (the `drift` event's rows), so the register-shift AUC can be computed
again on the CPU without the model: used for the issue-25 sweep, whose AUCs were first read with
folds that split each prompt's two answers apart (biased far below 0.5). NeutralKL and the base's
perplexities need the model and are taken as logged. The controls are re-read where the run logged
their texts; older runs need `drift_controls.py` on the same model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from steer_heal.evaluate.drift import register_shift
from steer_heal.evaluate.judge import Embedder
from steer_heal.run.runlog import read_events


def reread(run_dir: Path, embed) -> dict:
    events = read_events(run_dir / "events.jsonl")
    neutral = next(e for e in events if e["event"] == "neutral")
    base = [c["text"] for c in neutral["drift_base"]]
    out = {"run": run_dir.name, "rounds": {}}
    controls = neutral.get("controls") or {}
    for key in ("positive", "negative"):
        texts = controls.get(f"{key}_texts")
        if texts:
            out[f"{key}_auc"] = register_shift(embed, texts, base)["auc"]
    for e in events:
        if e["event"] == "drift":
            result = e["result"]
            student = [row["text"] for row in result["rows"]]
            seed = int(result["meta"].get("seed", 0))
            shift = register_shift(embed, student, base, seed=seed)
            out["rounds"][e["round"]] = {
                "auc": shift["auc"],
                "auc_logged": result["metrics"]["auc"],
                "kl_rev": result["metrics"]["kl_rev"],
                "student_base_ppl": result["metrics"]["student_base_ppl"],
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    embed = Embedder()
    results = [reread(Path(r), embed) for r in args.runs]
    for r in results:
        rounds = ", ".join(f"r{k}: AUC {v['auc']:.2f} (logged {v['auc_logged']:.2f})" for k, v in r["rounds"].items())
        print(f"{r['run']}: {rounds}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
