"""Steer and compare side by side.

Extracts a mean-difference steering vector from the bundled care-versus-authority axis
(`steer_heal.data.load_axis("authority")`, a persona pair plus a prompt pool) over a slice
of the bundled extraction contexts, then generates greedy completions of a few prompts
twice: as the model is, and with `coeff * vector` added to the residual stream of the
vector's layers. Steering is scoped to the `generate` call; the model is untouched after.

    python examples/steer_side_by_side.py                      # the embedded SmolLM2-135M
    python examples/steer_side_by_side.py --model tiny-llama   # a random tiny model (seconds)
"""

from __future__ import annotations

import argparse
import textwrap

from steer_heal import SteeringVector, generate, load_model
from steer_heal.data import load_axis, load_contexts
from steer_heal.sampling import Sampling


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="HF id, local path, smollm2-135m or tiny-<family>")
    p.add_argument("--axis", default="authority", help="bundled axis name (authority, love) or a .toml file")
    p.add_argument("--n-contexts", type=int, default=64, help="extraction contexts (user messages)")
    p.add_argument("--n-prompts", type=int, default=2)
    p.add_argument("--coeff", type=float, default=2.0, help="1.0 = as strong as the persona prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()

    model, tok = load_model(args.model)
    axis = load_axis(args.axis)
    vec = SteeringVector.from_persona_pair(
        model, tok, pos=axis.pos, neg=axis.neg, contexts=load_contexts()[: args.n_contexts], layers=(0.45, 0.55)
    )
    print(f"vector on layers {list(vec.layers)}, norms " + ", ".join(f"{n:.2f}" for n in vec.norms().values()))

    prompts = axis.prompts[: args.n_prompts]
    plain = generate(model, tok, prompts, sampling=Sampling(max_new_tokens=args.max_new_tokens))
    steered = generate(
        model, tok, prompts, steering=vec, coeff=args.coeff, sampling=Sampling(max_new_tokens=args.max_new_tokens)
    )

    for a, b in zip(plain, steered):
        print(f"\n> {a.prompt}")
        print("  unsteered:\n" + textwrap.indent(textwrap.fill(a.text, 96), "    "))
        print(f"  steered (coeff {args.coeff:g}):\n" + textwrap.indent(textwrap.fill(b.text, 96), "    "))


if __name__ == "__main__":
    main()
