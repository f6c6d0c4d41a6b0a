"""Mean difference against repeng's PCA of paired differences, on SmolLM2's love axis (issue 30).

    python benchmarks/science/pairs_methods.py [--out docs/runs/science/pairs_methods.json]

Both vectors come from the same 256 contrastive pairs: each bundled context as a chat
prompt under the pos persona and under the neg persona (`from_pairs` on those texts equals
`from_persona_pair` bitwise), read at the last token, layers 0.45-0.55 of depth. Each is
applied at c = 1, 2 and 4; measured: the crossed answer log-odds stance and wording shifts
against the base (32 held-out scenarios, 95% paired bootstrap intervals) and the 7-way
vignette coherence on a fixed stratified subset of 42 items, as a multiple of the base's.

Rule, written before the run (2026-12-07): the method that carries more stance is the one
with the larger stance shift at the largest dose whose coherence is >= 0.95 x base; if
their intervals there overlap, neither is said to carry more. 2-core CPU, float32.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from steer_heal import SteeringVector, load_model
from steer_heal.data import load_axis, load_contexts
from steer_heal.evaluate import AnswerLogOdds, Vignettes, load_vignettes, shift, stratified_subset
from steer_heal.models.model import Depth, chat_prompt
from steer_heal.steering.pairs import ContrastPair

DOSES = (1.0, 2.0, 4.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/runs/science/pairs_methods.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m", device="cpu", dtype="float32")
    axis = load_axis("love")
    pairs = [
        ContrastPair(chat_prompt(tok, c, system=axis.pos), chat_prompt(tok, c, system=axis.neg))
        for c in load_contexts()[:256]
    ]
    probe = AnswerLogOdds.from_axis(axis, batch_size=32)
    vignettes = Vignettes(items=stratified_subset(load_vignettes(), 42, seed=0), think_tokens=0)
    base, base_coh = probe(model, tok), vignettes(model, tok).metrics["coherence"]
    out = {"machine": "2-core AMD EPYC CPU, torch 2.13.0+cpu, float32", "base_coherence": base_coh, "methods": {}}
    for method in ("mean_diff", "pca"):
        vec = SteeringVector.from_pairs(model, tok, pairs, layers=Depth(0.45, 0.55), method=method, batch_size=32)
        rows = {"norms": vec.norms(), "doses": {}}
        for c in DOSES:
            with vec.apply(model, c):
                result, coh = probe(model, tok), vignettes(model, tok).metrics["coherence"]
            cells = {k: shift(base, result, k).to_dict() for k in ("stance", "wording")}
            rows["doses"][str(c)] = cells | {"coherence_x_base": coh / base_coh}
            print(method, c, {k: round(v["mean"], 3) for k, v in cells.items()}, round(coh / base_coh, 3), flush=True)
        out["methods"][method] = rows
    out["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{out['seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
