"""Evaluate a model with and without a steering vector (and with the persona prompted).

`Vignettes` is the forced-choice moral-foundations probe: for each scenario the model is
asked which foundation the act violates, and the result reports, per foundation, the log
of the mean probability in nats, plus coherence (probability mass on the allowed answer
tokens). An evaluator runs the model as it is given, so steering goes around the call.
`compare` gives paired deltas against the base and a verdict (coherence is checked
first, so a broken model never reads "ok"); `stage_table` puts every stage in one table.

    python examples/evaluate_with_and_without.py --coeff 1.0
    python examples/evaluate_with_and_without.py --model tiny-llama --n-contexts 8 --n-items 7 --think-tokens 0
"""

from __future__ import annotations

import argparse

from steer_heal import SteeringVector, load_model
from steer_heal.data import load_axis, load_contexts
from steer_heal.evaluate import Vignettes, compare, load_vignettes, stage_table, stratified_subset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="HF id, local path, smollm2-135m or tiny-<family>")
    p.add_argument("--vector", default=None, help="a saved .safetensors vector (default: extract one)")
    p.add_argument("--n-contexts", type=int, default=64)
    p.add_argument("--coeff", type=float, default=1.0)
    p.add_argument("--n-items", type=int, default=35, help="stratified subset of the bundled vignettes (0: all)")
    p.add_argument("--think-tokens", type=int, default=0, help="greedy tokens the model writes before answering")
    args = p.parse_args()

    model, tok = load_model(args.model)
    axis = load_axis("authority")
    vec = (
        SteeringVector.load(args.vector)
        if args.vector
        else SteeringVector.from_persona_pair(model, tok, axis.pos, axis.neg, load_contexts()[: args.n_contexts])
    )

    items = load_vignettes()
    if 0 < args.n_items < len(items):
        items = stratified_subset(items, args.n_items)
    probe = Vignettes(items=items, think_tokens=args.think_tokens)
    prompted = Vignettes(items=items, think_tokens=args.think_tokens, system=axis.pos)  # same items and protocol

    stages = {"base": probe(model, tok), "prompted": prompted(model, tok)}
    with vec.apply(model, args.coeff):
        stages["steered"] = probe(model, tok)

    c = compare(stages["base"], stages["steered"], target=axis.target, direction=axis.direction)
    print(
        f"steered vs base: d {c.target} {c.d_target:+.3f} nats, coherence {c.coherence:.3f} "
        f"({c.d_coherence:+.3f}), surgical {c.surgical}, verdict {c.verdict} ({c.reason})"
    )
    print()
    print(stage_table(stages, target=axis.target, direction=axis.direction))


if __name__ == "__main__":
    main()
