"""Batched think-then-answer scoring with a shared prompt prefix.

For a batch of token sequences that end with the assistant tag, `think_and_answer`:

1. runs the longest common token prefix of the batch once (batch 1) and repeats its KV
   cache over the batch: the vignette prompts share the template, the question and the
   option list, so only the scenario tail is computed per row (about 3x fewer tokens);
2. runs each row's remaining tokens, left-padded after the shared prefix, with explicit
   position ids that count real tokens only (so a padded row sees the positions it would
   see alone) and an attention mask that hides the pad slots;
3. decodes `think` greedy tokens with end-of-turn tokens suppressed (so every row gets the
   full budget), then feeds the last thought token and the fixed prefill ids in one step;
4. returns the next-token log-probs of the option tokens after the prefill and the mean
   NLL of the prefill tokens.

The result equals scoring each row alone without a cache, up to float rounding (tested).
Models with a sliding attention window keep cache slots, not tokens, in the window, so
padding inside the sequence would shift it: when a row could outgrow the window the
prefix is not shared and rows are plainly left-padded, which is exact.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..errors import InputError
from ..models.model import unwrap


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token id lists."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != first[k] for s in seqs):
            return k
    return n


def _sliding_window(model: nn.Module) -> int | None:
    config = unwrap(model).config
    config = getattr(config, "text_config", None) or config
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window) if isinstance(window, int) and window > 0 else None


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.x renamed the forward's `past_key_values` argument to `cache`."""
    params = inspect.signature(unwrap(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward(
    model: nn.Module,
    ids: Int[Tensor, "batch new"],
    mask: Int[Tensor, "batch total"],
    positions: Int[Tensor, "batch new"],
    cache,
    keep: int,
):
    kwargs = {_cache_kwarg(model): cache}
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=keep, **kwargs
    )
    return out.logits.float().to(ids.device), out["cache"] if "cache" in out else out["past_key_values"]


@torch.inference_mode()
def think_and_answer(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    think: int,
    prefill: Sequence[int],
    option_ids: Sequence[int],
    suppress: Sequence[int],
    pad: int,
    device: torch.device,
) -> tuple[list[list[int]], Float[Tensor, "batch options"], Float[Tensor, " batch"]]:
    """(thought ids per row, option log-probs after the prefill, mean prefill NLL per row)."""
    if not seqs or any(len(s) == 0 for s in seqs) or not prefill:
        raise InputError("need non-empty sequences and a non-empty prefill")
    batch, n_pre = len(seqs), len(prefill)
    prefill_t = torch.tensor(list(prefill), device=device).expand(batch, -1)
    # with no thinking the prefill rides along with the prompt, so it is part of the tail
    rows = [list(s) + (list(prefill) if think == 0 else []) for s in seqs]
    reserve = n_pre + 1 if think == 0 else 1  # tail tokens whose logits are read
    shared = min(common_prefix(rows), min(len(r) for r in rows) - reserve)
    window = _sliding_window(model)
    if window is not None and max(len(r) for r in rows) + think + n_pre >= window - 1:
        shared = 0
    cache = None
    if shared > 0:
        head = torch.tensor([rows[0][:shared]], device=device)
        _, cache = _forward(model, head, torch.ones_like(head), torch.arange(shared, device=device)[None], None, 1)
        cache.batch_repeat_interleave(batch)

    tails = [r[shared:] for r in rows]
    width = max(len(t) for t in tails)
    ids = torch.full((batch, width), pad, dtype=torch.long)
    tail_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, t in enumerate(tails):
        ids[i, width - len(t) :] = torch.tensor(t)
        tail_mask[i, width - len(t) :] = 1
    ids, tail_mask = ids.to(device), tail_mask.to(device)
    mask = torch.cat([torch.ones((batch, shared), dtype=torch.long, device=device), tail_mask], 1)
    positions = (shared + tail_mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = _forward(model, ids, mask, positions, cache, reserve)

    thoughts = torch.empty((batch, think), dtype=torch.long, device=device)
    blocked = torch.tensor(list(suppress), dtype=torch.long, device=device)
    last = positions[:, -1:]
    for step in range(think):
        if step > 0:
            mask = torch.cat([mask, mask.new_ones((batch, 1))], 1)
            last = last + 1
            logits, cache = _forward(model, thoughts[:, step - 1 : step], mask, last, cache, 1)
        scores = logits[:, -1].clone()
        scores[:, blocked] = float("-inf")  # end-of-turn may not end the thinking early
        thoughts[:, step] = scores.argmax(-1)
    if think > 0:
        step_ids = torch.cat([thoughts[:, -1:], prefill_t], 1)
        mask = torch.cat([mask, mask.new_ones((batch, n_pre + 1))], 1)
        step_pos = last + 1 + torch.arange(n_pre + 1, device=device)[None]
        logits, _ = _forward(model, step_ids, mask, step_pos, cache, n_pre + 1)

    logp = logits.log_softmax(-1)  # (batch, n_pre + 1, vocab): predicts prefill[0..], then the answer
    prefill_logp = logp[:, :-1].gather(-1, prefill_t.unsqueeze(-1)).squeeze(-1)
    option_logp = logp[:, -1, list(option_ids)]
    return thoughts.tolist(), option_logp.cpu(), (-prefill_logp.mean(-1)).double().cpu()
