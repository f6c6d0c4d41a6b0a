"""Bake a vector, check it equals hooks, and save/load it.

`vec.apply(model, c)` adds `c * v_l` to block l's output with forward hooks; `vec.bake(model, c)`
adds the same numbers to the bias of the linear that writes the MLP output into the residual
stream, so no hook runs. This script extracts a vector, runs one forward pass each way and
prints the largest logit difference (float rounding only), checks that the model is restored
bit for bit after both context managers, then saves the vector to safetensors (with its
provenance in the metadata) and loads it back.

    python examples/bake_save_load.py --out care.safetensors
    python examples/bake_save_load.py --model tiny-llama
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from steer_heal import SteeringVector, load_model
from steer_heal.data import load_axis, load_contexts
from steer_heal.models import chat_prompt


def logits(model, tok, text: str) -> torch.Tensor:
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="HF id, local path, smollm2-135m or tiny-<family>")
    p.add_argument("--n-contexts", type=int, default=64)
    p.add_argument("--coeff", type=float, default=2.0)
    p.add_argument("--out", default=None, help="where to save the vector (default: a temporary directory)")
    args = p.parse_args()

    model, tok = load_model(args.model)
    axis = load_axis("authority")
    vec = SteeringVector.from_persona_pair(model, tok, axis.pos, axis.neg, load_contexts()[: args.n_contexts])
    text = chat_prompt(tok, axis.prompts[0])

    before = logits(model, tok, text)
    with vec.apply(model, coeff=args.coeff):  # hooks
        hooked = logits(model, tok, text)
    with vec.bake(model, coeff=args.coeff):  # bias
        baked = logits(model, tok, text)
    after = logits(model, tok, text)

    print(f"steering moved the logits by up to {(hooked - before).abs().max():.4g}")
    print(f"max |apply - bake| = {(hooked - baked).abs().max():.3g}  (float rounding only)")
    assert torch.allclose(hooked, baked, atol=1e-4, rtol=1e-4), "bake should reproduce apply"
    assert torch.equal(before, after), "the model should be restored exactly"
    print("model restored bit for bit after apply and bake")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.out or Path(tmp) / "vector.safetensors")
        vec.save(path)
        loaded = SteeringVector.load(path)
        same = all(torch.equal(vec.directions[layer], loaded.directions[layer]) for layer in vec.layers)
        assert same and loaded.layers == vec.layers
        print(
            f"saved and reloaded {path.name}: layers {list(loaded.layers)}, model {loaded.model_id!r}, "
            f"cosine to the original {loaded.cosine(vec):.6f}"
        )
        print("metadata:", {k: v for k, v in loaded.metadata().items() if k in ("format", "hidden_size", "method")})


if __name__ == "__main__":
    main()
