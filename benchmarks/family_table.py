"""The family table of issue 15, measured on tiny random models of every family in the
verified table (4 layers, 64 wide, float32, CPU):

- blocks: where the table finds them, and whether structural discovery finds the same;
- apply = hook: `vec.apply` logits bitwise equal to a hand-written forward hook;
- bake: max |bake - apply| / max |apply| over the logits, or the refusal's reason;
- discovery's own verdict on the bias fold (the one-time check on a float32 block copy);
- one heal step: the NLL before and after one optimiser step on two completions.

    python benchmarks/family_table.py     # prints a markdown table (about 20 s on 2 cores)
"""

from __future__ import annotations

import torch

from steer_heal import SteeringVector
from steer_heal.healing.lora import LoraSettings
from steer_heal.healing.regularizers import KLRev
from steer_heal.healing.train import TrainSettings, heal
from steer_heal.models.architecture import architecture, discover, fold_error, get_path
from steer_heal.models.model import chat_prompt, encode
from steer_heal.models.tiny import FAMILY_NAMES, tiny_model
from steer_heal.steering.generation import Completion


@torch.no_grad()
def row(family: str) -> str:
    model, tok = tiny_model(family)
    arch, found = architecture(model), discover(model)
    ids = torch.tensor([encode(tok, chat_prompt(tok, "What should I do about my boss?"))])
    g = torch.Generator().manual_seed(1)
    vec = SteeringVector({layer: torch.randn(64, generator=g) for layer in (1, 2)}, 64, 4, f"tiny-{family}")
    blocks = get_path(model, arch.blocks)
    handles = [
        blocks[layer].register_forward_hook(
            lambda m, a, o, d=2.0 * v: (o[0] + d, *o[1:]) if isinstance(o, tuple) else o + d
        )
        for layer, v in vec.directions.items()
    ]
    by_hand = model(ids).logits
    for h in handles:
        h.remove()
    with vec.apply(model, 2.0):
        hooked = model(ids).logits
    try:
        with vec.bake(model, 2.0):
            baked = model(ids).logits
        bake = f"{((baked - hooked).abs().max() / hooked.abs().max()).item():.1e}"
    except ValueError as exc:
        bake = "refused: " + str(exc).split(": ", 1)[1].split(":")[0]
    check = f"{fold_error(model, 1, found.writer):.1e}" if found.writer else "no single writer"
    with torch.enable_grad():
        done = [
            Completion(p, t, tuple(encode(tok, t)), 0.0, "stop", prompt_text=chat_prompt(tok, p))
            for p, t in (("hi", "I think we should help them first."), ("Tell me", "The rules say one thing."))
        ]
        result = heal(
            model,
            tok,
            done * 4,
            [KLRev()],
            "base",
            LoraSettings(r=4, alpha=8),
            TrainSettings(epochs=1, batch_size=4, lr=1e-3, val_frac=0.25, max_steps=1),
            progress=False,
        )
    step = result.steps[0]
    return (
        f"| {family} | `{arch.blocks}` | {'yes' if found.blocks == arch.blocks else 'no'} | "
        f"{'bitwise' if torch.equal(hooked, by_hand) else 'DIFFERS'} | {bake} | {check} | nll {step.nll:.3f} |"
    )


def main() -> None:
    print(
        "| family | blocks | discovery agrees | apply = hook | bake vs apply (rel) | discovered fold error | one heal step |"
    )
    print("|---|---|---|---|---|---|---|")
    for family in FAMILY_NAMES:
        print(row(family), flush=True)


if __name__ == "__main__":
    main()
