"""Written by hand, not read from steer_heal, so the tests check the library against it:
what each family's tiny model looks like (`EXPECTED`: family -> block list path, and how a
bias fold behaves, "exact" or the reason word bake gives), and the definition of a
persona-pair vector (`hand_extracted`).
"""

import torch

from steer_heal.models.model import chat_prompt, encode


class HandVector(dict):
    """layer -> direction, plus `scale`: the largest activation the extraction read, which
    bounds the rounding a reordered computation of the same directions may carry."""

    scale: float = 0.0


@torch.no_grad()
def hand_extracted(model, tok, blocks, layers, pos: str, neg: str, contexts) -> HandVector:
    """One prompt at a time, block outputs read at the last prompt token with plain hooks on
    `blocks`, pos minus neg, averaged over `contexts`: the definition of the vector."""
    sums = {layer: None for layer in layers}
    out = HandVector()
    for sign, persona in ((1.0, pos), (-1.0, neg)):
        for context in contexts:
            seen = {}
            handles = [
                blocks[layer].register_forward_hook(
                    lambda m, a, o, layer=layer: seen.__setitem__(layer, (o[0] if isinstance(o, tuple) else o)[0])
                )
                for layer in layers
            ]
            try:
                model(torch.tensor([encode(tok, chat_prompt(tok, context, system=persona))]))
            finally:
                for h in handles:
                    h.remove()
            for layer in layers:
                # the whole sequence's activations feed the last token through attention
                out.scale = max(out.scale, float(seen[layer].abs().max()))
                value = sign * seen[layer][-1].double()
                sums[layer] = value if sums[layer] is None else sums[layer] + value
    out.update({layer: (s / len(contexts)).float() for layer, s in sums.items()})
    return out


EXPECTED = {
    "llama": ("model.layers", "exact"),
    "mistral": ("model.layers", "exact"),
    "qwen2": ("model.layers", "exact"),
    "qwen3": ("model.layers", "exact"),
    "phi3": ("model.layers", "exact"),
    "gemma": ("model.layers", "exact"),
    "gemma2": ("model.layers", "post-norm"),
    "gemma3_text": ("model.layers", "post-norm"),
    "smollm3": ("model.layers", "exact"),
    "olmo": ("model.layers", "exact"),
    "olmo2": ("model.layers", "post-norm"),
    "granite": ("model.layers", "multiplier"),
    "cohere": ("model.layers", "exact"),
    "cohere2": ("model.layers", "exact"),
    "glm4": ("model.layers", "post-norm"),
    "stablelm": ("model.layers", "exact"),
    "starcoder2": ("model.layers", "exact"),
    "phi": ("model.layers", "exact"),
    "qwen2_moe": ("model.layers", "MoE"),
    "qwen3_moe": ("model.layers", "MoE"),
    "mixtral": ("model.layers", "MoE"),
    "gpt_oss": ("model.layers", "MoE"),
    "gpt2": ("transformer.h", "exact"),
    "gpt_neox": ("gpt_neox.layers", "exact"),
    "bloom": ("transformer.h", "exact"),
    "falcon": ("transformer.h", "exact"),
    "opt": ("model.decoder.layers", "exact"),
}
