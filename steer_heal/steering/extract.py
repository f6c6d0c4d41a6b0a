"""Mean-difference extraction of a steering vector from a persona pair.

For each context x (a user message) and layer l, read the block output at the last prompt
token (the assistant tag after the generation prompt) with the system persona `pos` and
with `neg`:

    v_l = mean_x [ h_l(pos, x)[-1] - h_l(neg, x)[-1] ]

No normalisation: the scale is the persona's natural shift, so coeff 1.0 is "as strong as
the prompt". Pairs should be direct opposites without negation, so the difference isolates
the axis rather than "having a persona".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import InputError
from ..models.model import (
    Depth,
    LayerSpec,
    chat_prompt,
    decoder_blocks,
    encode,
    hidden_size,
    input_device,
    left_pad,
    n_layers,
    pad_id,
    resolve_layers,
)
from ..shards import map_batches


class _Enough(Exception):
    """Raised by the deepest hook: later blocks and the LM head are not needed."""


def last_token_states(
    model: nn.Module,
    tok,
    texts: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 8,
    progress: bool = False,
) -> dict[int, Float[Tensor, "n hidden"]]:
    """Block outputs at the last token of each (already formatted) text, fp32 on CPU.

    Batched with left padding, so the last column is every row's last real token. The
    forward stops after the deepest requested block.
    """
    if not texts:
        raise InputError("no texts to read hidden states from")
    return token_states(model, [encode(tok, text) for text in texts], pad_id(tok), layers, batch_size, progress)


@torch.inference_mode()
def token_states(
    model: nn.Module,
    token_lists: Sequence[Sequence[int]],
    pad: int,
    layers: Sequence[int],
    batch_size: int = 8,
    progress: bool = False,
    spans: Sequence[int] | None = None,
) -> dict[int, Float[Tensor, "n hidden"]]:
    """Block outputs of token sequences, fp32 on CPU: at each row's last token, or, with
    `spans`, the mean over row i's tokens from index `spans[i]` to its end (e.g. an answer)."""
    if not token_lists:
        raise InputError("no texts to read hidden states from")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if spans is not None and any(not 0 <= s < len(t) for s, t in zip(spans, token_lists)):
        raise InputError("every span must start inside its sequence (an empty answer has no tokens to average)")
    blocks = decoder_blocks(model)
    layers = sorted(set(layers))
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))  # less padding per batch
    out = {layer: torch.empty(len(token_lists), hidden_size(model)) for layer in layers}
    captured: dict[int, Tensor] = {}
    weights: list[Tensor] = []  # per batch: (rows, columns) averaging weights, or none for the last token

    def reader(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if weights:
                w = weights[0].to(hidden.device)
                captured[layer] = ((hidden.float() * w[..., None]).sum(1) / w.sum(1, keepdim=True)).cpu()
            else:
                captured[layer] = hidden[:, -1, :].float().cpu()
            if layer == layers[-1]:
                raise _Enough

        return hook

    handles = [blocks[layer].register_forward_hook(reader(layer)) for layer in layers]
    device = input_device(model)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    bar = tqdm(total=len(batches), desc="hidden states", disable=not progress, leave=False)

    def one(b: int) -> dict[int, Tensor]:
        rows = batches[b]
        ids, mask, positions = left_pad([list(token_lists[i]) for i in rows], pad, device)
        captured.clear()
        weights.clear()
        if spans is not None:  # left padded: row i's span is its last len - span columns
            width = ids.shape[1]
            column = torch.arange(width)
            first = torch.tensor([width - (len(token_lists[i]) - spans[i]) for i in rows])
            weights.append((column[None, :] >= first[:, None]).float())
        try:
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        except _Enough:
            pass
        bar.update(1)
        return {layer: captured[layer] for layer in layers}

    try:
        for rows, states in zip(batches, map_batches(one, len(batches))):
            for layer in layers:
                out[layer][rows] = states[layer]
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    return out


def check_personas(pos: str, neg: str) -> None:
    for name, text in (("pos", pos), ("neg", neg)):
        if not isinstance(text, str) or not text.strip():
            raise InputError(
                f"the {name} persona is empty; give a system prompt (or leave --{name} out for the axis's)"
            )
    if pos.strip() == neg.strip():
        raise InputError("pos and neg personas are identical; the difference would be zero")


def mean_difference(
    model: nn.Module,
    tok,
    pos: str,
    neg: str,
    contexts: Sequence[str],
    layers: LayerSpec = Depth(0.45, 0.55),
    batch_size: int = 8,
    progress: bool = False,
) -> dict[int, Float[Tensor, " hidden"]]:
    """The directions `mean(h(pos) - h(neg))` at the last prompt token, per layer (fp32, CPU).

    `SteeringVector.from_persona_pair` wraps them with their provenance.
    """
    if not contexts:
        raise InputError("contexts is empty; pass a few hundred diverse user messages")
    check_personas(pos, neg)
    chosen = resolve_layers(layers, n_layers(model))
    texts = [chat_prompt(tok, context, system=persona) for persona in (pos, neg) for context in contexts]
    states = last_token_states(model, tok, texts, chosen, batch_size=batch_size, progress=progress)
    n = len(contexts)
    return {layer: (h[:n].double().mean(0) - h[n:].double().mean(0)).float() for layer, h in states.items()}
