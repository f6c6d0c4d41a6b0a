"""One distill-and-heal round by hand, from the primitives (no runner, no run directory).

    extract v from the persona pair
    walk_dose: largest coefficient whose probe batch keeps >= target under the filter
    collect:   steered completions at that dose, filtered (perplexity under the BASE model)
    heal:      a fresh LoRA on the kept completions, NLL + reverse-KL barrier to `prev`
    fold:      the adapter joins the History; the model now runs as the student
    evaluate:  Vignettes on base, steered and healed, then a paired stage table

`History` keeps the base recoverable without a second copy of the weights: `history.base`
switches the folded adapters off for the duration of a `with`, which is what the filter's
perplexity runs under.

    python examples/one_round_by_hand.py
    python examples/one_round_by_hand.py --model tiny-llama --n-contexts 8 --max-new-tokens 8 \
        --n-keep 4 --epochs 1 --n-items 7 --ppl-tau 1e9 --target 0.01
"""

from __future__ import annotations

import argparse

from steer_heal import SteeringVector, load_model
from steer_heal.data import load_axis, load_contexts
from steer_heal.evaluate import Vignettes, load_vignettes, stage_table, stratified_subset
from steer_heal.filters import collect, default_filter, walk_dose
from steer_heal.healing import History, KLRev, LoraSettings, TrainSettings, heal
from steer_heal.sampling import Sampling


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="HF id, local path, smollm2-135m or tiny-<family>")
    p.add_argument("--n-contexts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--target", type=float, default=0.75, help="kept fraction the dose must reach")
    p.add_argument("--ppl-tau", type=float, default=50.0, help="drop completions whose tail perplexity exceeds this")
    p.add_argument("--n-keep", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-items", type=int, default=35, help="vignettes in the evaluation (stratified subset)")
    p.add_argument("--think-tokens", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model, tok = load_model(args.model)
    axis = load_axis("authority")
    # the model is modified in place (LoRA layers) until the History closes
    with History(model) as history:
        probe = Vignettes(
            items=stratified_subset(load_vignettes(), args.n_items, seed=args.seed), think_tokens=args.think_tokens
        )
        stages = {"base": probe(history.model, tok)}

        # 1. steer: extract from the current student (the base, in round 0)
        vec = SteeringVector.from_persona_pair(
            history.model, tok, axis.pos, axis.neg, load_contexts()[: args.n_contexts]
        )

        # 2-3. generate + filter: perplexity under the base model, whatever the student is now
        filt = default_filter(history.base, tok, tau=args.ppl_tau)
        sampling = Sampling(max_new_tokens=args.max_new_tokens, do_sample=True, batch_size=8)
        dose = walk_dose(
            history.model,
            tok,
            vec,
            axis.prompts,
            filt,
            target=args.target,
            steps=2,
            probe_size=8,
            seed=args.seed,
            sampling=sampling,
        )
        print(dose.table())
        kept = collect(
            history.model,
            tok,
            vec,
            axis.prompts,
            filt,
            dose.coeff,
            n_keep=args.n_keep,
            max_batches=4,
            seed=args.seed + 1,
            sampling=sampling,
        )
        print(kept.report.table(fmt="plain"))
        print(f"kept {len(kept.kept)} of {len(kept.completions)} completions at coeff {dose.coeff:.3g}")

        with vec.apply(history.model, dose.coeff):
            stages["steered"] = probe(history.model, tok)

        # 4. heal: NLL on the kept completions + reverse-KL barrier (RMSE over positions) to `prev`
        result = heal(
            history,
            tok,
            kept.kept,
            regularizers=[KLRev(lam=1.0, tau=0.5, agg="rmse")],
            reference="prev",
            lora=LoraSettings(r=16, alpha=32),
            train=TrainSettings(epochs=args.epochs, seed=args.seed),
        )
        for e in result.epochs:
            print(
                f"heal epoch {e.epoch}: train nll {e.train_nll:.3f}"
                + ("" if e.val_nll is None else f", val nll {e.val_nll:.3f}")
            )

        # 5. fold: the model now runs as the student; history.base() still gives the base exactly
        history.fold(result)
        stages["healed"] = probe(history.model, tok)

        print()
        print(stage_table(stages, target=axis.target, direction=axis.direction))


if __name__ == "__main__":
    main()
