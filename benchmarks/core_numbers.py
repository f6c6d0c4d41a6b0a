"""Numbers for the core: bake-vs-apply and batched-vs-single errors per tiny family, and on
the embedded SmolLM2-135M (CPU) extraction time for 64 contexts and steered generation
throughput at batch 1 and 8.  Usage: python benchmarks/core_numbers.py [--skip-real]
"""

from __future__ import annotations

import sys
import time

import torch

from steer_heal import SteeringVector, generate, load_model
from steer_heal.data import load_axis, load_contexts
from steer_heal.models.model import chat_prompt, encode
from steer_heal.models.tiny import FAMILY_NAMES, tiny_model
from steer_heal.sampling import Sampling


@torch.no_grad()
def family_errors() -> None:
    axis = load_axis("authority")
    contexts = load_contexts()[:6]
    print("| family | bake vs apply (rel. max abs logit diff) | batched vs single extraction (rel. L2) |")
    print("|---|---|---|")
    for family in FAMILY_NAMES:
        model, tok = tiny_model(family)
        vec = SteeringVector.from_persona_pair(
            model, tok, axis.pos, axis.neg, contexts, layers=(0.25, 0.75), batch_size=6
        )
        single = SteeringVector.from_persona_pair(
            model, tok, axis.pos, axis.neg, contexts, layers=(0.25, 0.75), batch_size=1
        )
        ext = max(
            float((vec.directions[l] - single.directions[l]).norm() / single.directions[l].norm()) for l in vec.layers
        )
        ids = torch.tensor([encode(tok, chat_prompt(tok, "My boss told me to skip the check."))])
        unit = vec * (1.0 / max(vec.norms().values()))
        with unit.apply(model, 2.0):
            hooked = model(ids).logits
        try:
            with unit.bake(model, 2.0):
                baked = model(ids).logits
            bake = f"{float((baked - hooked).abs().max() / hooked.abs().max()):.1e}"
        except ValueError:
            bake = "refused (post-FFN norm)"
        print(f"| {family} | {bake} | {ext:.1e} |")


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def real_numbers() -> None:
    model, tok = load_model("smollm2-135m")
    axis = load_axis("authority")
    contexts = load_contexts()[:64]
    t = timed(
        lambda: SteeringVector.from_persona_pair(model, tok, axis.pos, axis.neg, contexts, batch_size=8), repeats=2
    )
    print(f"\nextraction, 64 contexts x 2 personas, batch 8, layers 13-16: {t:.2f} s ({128 / t:.1f} prompts/s)")
    vec = SteeringVector.from_persona_pair(model, tok, axis.pos, axis.neg, contexts, batch_size=8)
    prompts = axis.prompts[:8]
    new = 64
    print("\n| batch | variant | tok/s |\n|---|---|---|")
    for batch in (1, 8):
        ps = prompts[:batch]
        for name, kw in (
            ("unsteered", {}),
            ("hooks c=1", dict(steering=vec, coeff=1.0)),
            ("bias c=1", dict(steering=vec, coeff=1.0, how="bias")),
        ):
            # min_new_tokens is not exposed; count the tokens actually generated
            counts = []

            def run():
                out = generate(model, tok, ps, **kw, sampling=Sampling(max_new_tokens=new, batch_size=batch))
                counts.append(sum(len(c.token_ids) + (c.finish_reason == "stop") for c in out))

            t = timed(run, repeats=2)
            print(f"| {batch} | {name} | {counts[-1] / t:.1f} |")


if __name__ == "__main__":
    torch.set_num_threads(2)
    family_errors()
    if "--skip-real" not in sys.argv:
        real_numbers()
