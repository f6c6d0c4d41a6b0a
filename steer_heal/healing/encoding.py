"""Completions as training and scoring examples: prompt ids + completion ids (+ end of turn).

Each completion becomes `prompt_ids + completion_ids (+ end_of_turn)`: the chat-formatted
prompt (`Completion.prompt_text`, its special tokens included) encoded as is, the
completion's own token ids (no special tokens added), and the end-of-turn token when the
completion ended by stopping (`finish_reason == "stop"`; a completion cut at the token limit
did not end, and teaching a stop there would teach stopping mid-sentence). The prompt ids
are context, the rest are targets (`steer_heal.models.logprobs.Example`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import InputError
from ..models.logprobs import Example, mean_nll
from ..models.model import encode, end_of_turn_id, pad_id, unwrap
from ..runtime import eval_mode
from ..steering.generation import Completion


def encode_completions(tok, completions: Sequence[Completion], max_len: int | None) -> tuple[list[Example], int]:
    """Token ids per completion, truncated to `max_len`; returns (examples, number truncated)."""
    eot = end_of_turn_id(tok)
    examples, truncated = [], 0
    for c in completions:
        prompt = encode(tok, c.formatted_prompt(tok))
        body = list(c.token_ids) if c.token_ids else encode(tok, c.text)
        if c.finish_reason == "stop":
            body.append(eot)
        if not prompt or not body:
            continue  # nothing to predict (empty cut-off completion); counted by the caller
        if max_len is not None and len(prompt) + len(body) > max_len:
            truncated += 1
            prompt = prompt[-(max_len - 1) :] if len(prompt) >= max_len else prompt  # keep the assistant tag
            body = body[: max_len - len(prompt)]
        examples.append(Example(tuple(prompt + body), len(prompt)))
    return examples, truncated


def context_length(model: nn.Module, max_len: int | None) -> int | None:
    """The tokens a sequence may hold: the model's context and `max_len`, whichever is smaller."""
    context = getattr(unwrap(model).config, "max_position_embeddings", None)
    limits = [x for x in (context, max_len) if isinstance(x, int)]
    return min(limits) if limits else None


def completion_nll(
    model: nn.Module, tok, completions: Sequence[Completion], batch_size: int = 8, max_len: int | None = None
) -> float:
    """Mean NLL per completion token (end-of-turn included) under the model as it runs now."""
    examples, _ = encode_completions(tok, completions, context_length(model, max_len))
    if not examples:
        raise InputError("no completion tokens to score; pass non-empty completions")
    with eval_mode(model):
        return mean_nll(model, examples, pad_id(tok), batch_size)
