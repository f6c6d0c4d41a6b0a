"""A custom Filter and a custom Regularizer, plugged into `collect` and `heal`.

A `Filter` is any callable with a `name` mapping a list of `Completion`s to one `Verdict`
each (`keep`, `scores`, `reasons`); combine it with the built-in ones through `AllOf`, which
merges scores (the names must not clash) and concatenates the reasons. A reason is a
`Reason(filter, detail)` (a plain "name: detail" string is converted), so `FilterReport`
counts drops per filter by `reason.filter`.

A `Regularizer` is any object with `name`, `needs_reference`, `weight_decay` and
`__call__(ctx: RegContext) -> Penalty`; `heal` adds every penalty's `loss` to the NLL and
logs its `logs` under `<name>.<key>` in each `StepLog.extra`. Here: an L2 pull of the
LoRA parameters towards zero (the no-op adapter), next to the usual reverse-KL barrier.

    python examples/custom_filter_and_regularizer.py
    python examples/custom_filter_and_regularizer.py --model tiny-llama --n-contexts 8 --max-new-tokens 8 \
        --min-words 1 --n-keep 4 --epochs 1 --ppl-tau 1e9
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from steer_heal import Completion, SteeringVector, load_model
from steer_heal.data import load_axis, load_contexts
from steer_heal.filters import AllOf, Filter, Reason, Verdict, collect, default_filter
from steer_heal.healing import History, KLRev, LoraSettings, Penalty, RegContext, Regularizer, TrainSettings, heal
from steer_heal.sampling import Sampling


class MinWords:
    """Drop completions shorter than `n` words (too short to carry the trait)."""

    name = "min_words"

    def __init__(self, n: int = 12) -> None:
        self.n = n

    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]:
        verdicts = []
        for c in completions:
            words = len(c.text.split())
            reasons = [] if words >= self.n else [Reason(self.name, f"{words} < {self.n}")]
            verdicts.append(Verdict(keep=not reasons, scores={"words": float(words)}, reasons=reasons))
        return verdicts


@dataclass
class AdapterL2:
    """`lam * sum_p ||p||^2` over the trainable LoRA parameters of the current adapter."""

    lam: float = 1e-3
    name: str = field(default="adapter_l2", init=False)
    needs_reference: bool = field(default=False, init=False)  # no reference forward needed
    weight_decay: float = field(default=0.0, init=False)  # no optimiser-side decay

    def __call__(self, ctx: RegContext) -> Penalty:
        sq = torch.stack([p.float().square().sum() for p in ctx.params]).sum()
        return Penalty(self.lam * sq, logs={"sq_norm": float(sq.detach())}, active=self.lam > 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="HF id, local path, smollm2-135m or tiny-<family>")
    p.add_argument("--n-contexts", type=int, default=64)
    p.add_argument("--coeff", type=float, default=1.0, help="a fixed dose (see one_round_by_hand.py for walk_dose)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-words", type=int, default=12)
    p.add_argument("--ppl-tau", type=float, default=50.0)
    p.add_argument("--n-keep", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lam", type=float, default=1e-3, help="weight of the L2 penalty")
    args = p.parse_args()

    model, tok = load_model(args.model)
    axis = load_axis("authority")
    vec = SteeringVector.from_persona_pair(model, tok, axis.pos, axis.neg, load_contexts()[: args.n_contexts])

    with History(model) as history:
        flt = AllOf(MinWords(args.min_words), *default_filter(history.base, tok, tau=args.ppl_tau).filters)
        assert isinstance(flt, Filter) and isinstance(AdapterL2(), Regularizer)  # the Protocols are runtime-checkable
        got = collect(
            history.model,
            tok,
            vec,
            axis.prompts,
            flt,
            args.coeff,
            n_keep=args.n_keep,
            max_batches=4,
            sampling=Sampling(do_sample=True, max_new_tokens=args.max_new_tokens, batch_size=8),
        )
        print(got.report.table(fmt="plain", samples=True))

        result = heal(
            history,
            tok,
            got.kept,
            regularizers=[KLRev(), AdapterL2(args.lam)],
            lora=LoraSettings(r=8, alpha=16),
            train=TrainSettings(epochs=args.epochs),
        )
        last = result.steps[-1]
        print(
            f"heal: {len(result.steps)} steps, last nll {last.nll:.3f}, "
            f"adapter_l2.sq_norm {last.extra['adapter_l2.sq_norm']:.4g}, "
            f"klrev_rmse.divergence {last.extra['klrev_rmse.divergence']:.4g}"
        )
        history.fold(result)
        print(f"folded rounds: {list(history.names)}")


if __name__ == "__main__":
    main()
