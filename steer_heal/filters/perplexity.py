"""Perplexity (tail) under the ORIGINAL model.

With prompt tokens p (length P) and completion tokens y (length n), tokenised separately
and concatenated (so the prompt is an exact token prefix and no BPE merge spans the
boundary), and k = max(1, ceil(tail * n)):

    ppl = exp( -1/k * sum_{t = n-k}^{n-1} log p_theta(y_t | p, y_<t) )

under the original model (no steering, no adapters), computed by the one log-prob engine
(`steer_heal.models.logprobs`: only completion positions reach the output head). Loops have LOW
perplexity and pass this test; babble has high perplexity. Empty completion: ppl = inf
(dropped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import numpy as np
from torch import nn

from ..errors import InputError
from ..models.logprobs import Example, token_nlls
from ..models.model import encode, pad_id
from ..runtime import eval_mode
from ..steering.generation import Completion
from ..steering.hooks import active_steering
from ..vocab import Number
from .base import Reason, Verdict, check_fraction, check_nonempty, check_positive

PPL = "ppl"  # the perplexity score key, read by FilterReport

BaseModel = nn.Module | Callable[[], AbstractContextManager[nn.Module]]


def base_context(model: BaseModel) -> AbstractContextManager[nn.Module]:
    """A context yielding the original model: the model itself, or what a factory such as
    `history.base` yields (an nn.Module is callable too, so it is tested for first)."""
    return nullcontext(model) if isinstance(model, nn.Module) else model()


@contextmanager
def original_model(model: BaseModel, who: str) -> Iterator[nn.Module]:
    """The original model (see `base_context`), refused while any steering is active on it:
    a filter that scores "under the original model" must not score a steered one."""
    with base_context(model) as base:
        active = active_steering(base)
        if active:
            how = ", ".join(sorted({a.how for a in active}))
            raise InputError(
                f"{who} got a model with steering hooks or a baked vector active ({how}); score under the original "
                "model (filter outside the `vec.apply(...)` / `vec.bake(...)` block, or with the slot set to None)"
            )
        yield base


def completion_logprobs(
    model: nn.Module, tok, prompt_texts: Sequence[str], texts: Sequence[str], batch_size: int = 8
) -> list[np.ndarray]:
    """The log-prob of every completion token given its formatted prompt (an empty array for an
    empty completion), from one batched pass of the log-prob engine in eval mode."""
    if len(prompt_texts) != len(texts):
        raise InputError(f"{len(prompt_texts)} prompts for {len(texts)} completions; pass one prompt per completion")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    out = [np.empty(0)] * len(texts)
    index, examples = [], []
    for i, (prompt, text) in enumerate(zip(prompt_texts, texts)):
        prompt_ids, ids = encode(tok, prompt), encode(tok, text)
        if not prompt_ids:
            raise InputError(f"completion {i} has an empty prompt; ppl needs the chat-formatted prompt as context")
        if ids:
            index.append(i)
            examples.append(Example(tuple(prompt_ids + ids), len(prompt_ids)))
    with eval_mode(model):
        nlls = token_nlls(model, examples, pad_id(tok), batch_size)
    for i, nll in zip(index, nlls):
        out[i] = -nll.numpy()
    return out


def tail_ppl(logprobs: np.ndarray, tail: float) -> float:
    """exp of the mean NLL of the last `tail` fraction of the tokens (inf for no tokens)."""
    if len(logprobs) == 0:
        return math.inf
    k = max(1, math.ceil(tail * len(logprobs)))
    return math.exp(float(-logprobs[-k:].mean()))


def tail_perplexity(
    model: nn.Module,
    tok,
    prompt_texts: Sequence[str],
    texts: Sequence[str],
    tail: Number = 0.25,
    batch_size: int = 8,
) -> list[float]:
    """Perplexity of the last `tail` fraction of each completion given its formatted prompt.

    Rows are batched in length order and left-padded (position ids count real tokens only);
    the model runs in eval mode (dropout off), and the caller's mode is restored.
    """
    tail = check_fraction("tail", tail)
    return [tail_ppl(v, tail) for v in completion_logprobs(model, tok, prompt_texts, texts, batch_size)]


class Perplexity:
    """Drop completions whose tail perplexity under the ORIGINAL model exceeds `tau`.

    `model` is the unsteered base model, or a function returning a context that yields it
    (e.g. `history.base`, which switches a student's adapters off for the duration), so the
    filter can run beside generation from the student. Active steering (hooks, a slot with
    a non-zero vector, or a baked bias) is refused.
    """

    name = "perplexity"

    def __init__(self, model: BaseModel, tok, tau: Number = 50.0, tail: Number = 0.25, batch_size: int = 8) -> None:
        self.tau = check_positive("tau", tau)
        self.tail = check_fraction("tail", tail)
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tok, self.batch_size = model, tok, batch_size

    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]:
        check_nonempty(completions)
        prompts = [c.formatted_prompt(self.tok) for c in completions]
        with original_model(self.model, "Perplexity") as model:
            ppls = tail_perplexity(
                model, self.tok, prompts, [c.text for c in completions], tail=self.tail, batch_size=self.batch_size
            )
        return [
            Verdict(True, {PPL: p}, [])
            if p <= self.tau
            else Verdict(False, {PPL: p}, [Reason(self.name, f"tail ppl {p:.1f} > {self.tau:g}")])
            for p in ppls
        ]

    def __repr__(self) -> str:
        return f"Perplexity(tau={self.tau:g}, tail={self.tail:g})"
