"""Cheap filters that keep coherent, trait-enacting completions and log why others go.

A `Filter` maps completions to one `Verdict` each (`keep`, `scores`, `reasons`). Every
filter scores every completion, so `AllOf` can report overlapping reasons.

Perplexity (tail). With prompt tokens p (length P) and completion tokens y (length n),
tokenised separately and concatenated (so the prompt is an exact token prefix and no BPE
merge spans the boundary), and k = max(1, ceil(tail * n)):

    ppl = exp( -1/k * sum_{t = n-k}^{n-1} log p_theta(y_t | p, y_<t) )

under the ORIGINAL model (no steering, no adapters). Loops have LOW perplexity and pass
this test; babble has high perplexity. Empty completion: ppl = inf (dropped).

Repetition. For a token sequence s (words, or characters of the lower-cased,
whitespace-collapsed text) and n in {2, 3, 4}, with G_n the list of n-grams of s:

    share_n(s) = max_g count(g in G_n) / max(|G_n|, floor)

The floor (default 10) keeps short texts, whose few n-grams are all "the most common",
from scoring high. `repetition` = max over words/chars and n; drop if > tau. A period-p
word loop scores 1/p, so long-period loops (a sentence repeated) need the compressibility
guard: `compress` = len(zlib(text)) / len(text), drop if < compress_tau (for windows of
at least `min_chars`). Both are taken over the whole text and over its last `window`
fraction, because steered loops typically start part-way and run to the length cap.

Narration and Refusal are regular expressions / phrases matched case-insensitively.
"""

from __future__ import annotations

import inspect
import math
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from .generate import Completion
from .model import chat_prompt, encode, input_device, left_pad, pad_id, unwrap
from .vector import Number

PPL = "ppl"  # the perplexity score key, read by FilterReport


@dataclass(frozen=True)
class Verdict:
    """One completion's fate: kept or not, every score computed, why it was dropped."""

    keep: bool
    scores: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)  # "name: detail", empty when kept


def reason_name(reason: str) -> str:
    """The filter name of a reason string ("repetition: word 2-gram ..." -> "repetition")."""
    return reason.split(":", 1)[0].strip()


@runtime_checkable
class Filter(Protocol):
    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]: ...


def _check_nonempty(completions: Sequence[Completion]) -> None:
    if len(completions) == 0:
        raise ValueError("no completions to filter; generate some first (steer_heal.generate)")


def _check_positive(name: str, value: Number) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_fraction(name: str, value: Number) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


class AllOf:
    """Keep a completion only if every filter keeps it; scores merged, reasons concatenated."""

    def __init__(self, *filters: Filter) -> None:
        if not filters:
            raise ValueError("AllOf needs at least one filter, e.g. AllOf(Repetition(), Refusal())")
        self.filters = filters

    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]:
        _check_nonempty(completions)
        merged = [Verdict(True, {}, []) for _ in completions]
        for f in self.filters:
            verdicts = f(completions)
            if len(verdicts) != len(completions):
                raise ValueError(f"filter {f!r} returned {len(verdicts)} verdicts for {len(completions)} completions")
            for i, v in enumerate(verdicts):
                clash = merged[i].scores.keys() & v.scores.keys()
                if clash:  # a silent overwrite would hide one filter's numbers
                    raise ValueError(f"two filters in AllOf write the same score {sorted(clash)}; rename one")
                merged[i] = Verdict(
                    merged[i].keep and v.keep, {**merged[i].scores, **v.scores}, merged[i].reasons + list(v.reasons)
                )
        return merged

    def __repr__(self) -> str:
        return f"AllOf({', '.join(map(repr, self.filters))})"


# ---------------------------------------------------------------- perplexity


def _steering_hooks(model: nn.Module) -> int:
    """Steering hooks (`vector.add_to_output`, used by `vec.apply` and `SteeringSlot`)
    that currently add something: an idle slot's zero delta leaves the model unchanged."""
    active = 0
    for module in unwrap(model).modules():
        for hook in module._forward_hooks.values():
            if getattr(hook, "__qualname__", "").startswith("add_to_output."):
                # unwrap: a type-checking decorator (beartype in the tests) wraps the closure
                delta = inspect.getclosurevars(inspect.unwrap(hook)).nonlocals.get("delta")
                active += not isinstance(delta, Tensor) or bool((delta != 0).any())
    return active


def _tail_nll(
    logits: Float[Tensor, "batch k vocab"], targets: Int[Tensor, "batch k"], valid: Bool[Tensor, "batch k"]
) -> Float[Tensor, " batch"]:
    """Mean NLL over the valid (right-aligned tail) positions of each row."""
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    # where, not multiply: a short row's masked columns can sit on left padding, whose
    # logits may be NaN (a fully masked query), and NaN * 0 is NaN
    return torch.where(valid, nll, 0.0).sum(-1) / valid.sum(-1)


@torch.inference_mode()
def tail_perplexity(
    model: nn.Module,
    tok,
    prompt_texts: Sequence[str],
    texts: Sequence[str],
    tail: Number = 0.25,
    batch_size: int = 8,
) -> list[float]:
    """Perplexity of the last `tail` fraction of each completion given its formatted prompt.

    Rows are sorted by length and left-padded (position ids count real tokens only), so
    every row ends in the last column and the tail positions line up on the right; only
    those positions are projected to the vocabulary (`logits_to_keep`).
    """
    tail = _check_fraction("tail", tail)
    if len(prompt_texts) != len(texts):
        raise ValueError(f"{len(prompt_texts)} prompts for {len(texts)} completions; pass one prompt per completion")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = [math.inf] * len(texts)
    rows = []
    for i, (prompt, text) in enumerate(zip(prompt_texts, texts)):
        prompt_ids, ids = encode(tok, prompt), encode(tok, text)
        if not prompt_ids:
            raise ValueError(f"completion {i} has an empty prompt; ppl needs the chat-formatted prompt as context")
        if ids:  # an empty completion stays at inf
            rows.append((i, prompt_ids + ids, max(1, math.ceil(tail * len(ids)))))
    rows.sort(key=lambda r: len(r[1]))
    device, pad = input_device(model), pad_id(tok)
    was_training = model.training
    model.eval()  # dropout would make the score random; the caller's mode is restored below
    try:
        for i, value in _score_rows(model, rows, batch_size, device, pad):
            out[i] = value
    finally:
        model.train(was_training)
    return out


def _score_rows(
    model: nn.Module, rows: list[tuple[int, list[int], int]], batch_size: int, device: torch.device, pad: int
) -> Iterator[tuple[int, float]]:
    """(index, tail ppl) for rows of (index, prompt + completion ids, tail length k)."""
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids, mask, positions = left_pad([r[1] for r in batch], pad, device)
        width, kmax = ids.shape[1], max(r[2] for r in batch)
        # logits at column j predict the token at j + 1: the tail tokens in columns
        # width-kmax .. width-1 are predicted from columns width-kmax-1 .. width-2
        keep = torch.arange(width - kmax - 1, width - 1, device=device)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=keep
        ).logits.to(ids.device)  # the head may sit on another device under a device map
        k = torch.tensor([r[2] for r in batch], device=device)
        valid = torch.arange(kmax, device=device)[None, :] >= (kmax - k)[:, None]
        nll = _tail_nll(logits, ids[:, width - kmax :], valid)
        for (i, _, _), value in zip(batch, nll.tolist()):
            yield i, math.exp(value)


def formatted_prompt(tok, completion: Completion) -> str:
    """The chat-formatted prompt the completion answered (rebuilt if not recorded)."""
    return completion.prompt_text or chat_prompt(tok, completion.prompt, system=completion.system)


BaseModel = nn.Module | Callable[[], AbstractContextManager[nn.Module]]


class Perplexity:
    """Drop completions whose tail perplexity under the ORIGINAL model exceeds `tau`.

    `model` is the unsteered base model, or a function returning a context that yields it
    (e.g. `history.base`, which switches a student's adapters off for the duration), so the
    filter can run beside generation from the student. Active steering hooks are refused.
    """

    def __init__(self, model: BaseModel, tok, tau: Number = 50.0, tail: Number = 0.25, batch_size: int = 8) -> None:
        self.tau = _check_positive("tau", tau)
        self.tail = _check_fraction("tail", tail)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tok, self.batch_size = model, tok, batch_size

    def _base(self) -> AbstractContextManager[nn.Module]:
        # an nn.Module is callable too: test for it first
        return nullcontext(self.model) if isinstance(self.model, nn.Module) else self.model()

    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]:
        _check_nonempty(completions)
        prompts = [formatted_prompt(self.tok, c) for c in completions]
        with self._base() as model:
            if _steering_hooks(model):
                raise ValueError(
                    "Perplexity got a model with steering hooks active; score under the original model "
                    "(filter outside the `vec.apply(...)` block)"
                )
            ppls = tail_perplexity(
                model, self.tok, prompts, [c.text for c in completions], tail=self.tail, batch_size=self.batch_size
            )
        return [
            Verdict(True, {PPL: p}, [])
            if p <= self.tau
            else Verdict(False, {PPL: p}, [f"perplexity: tail ppl {p:.1f} > {self.tau:g}"])
            for p in ppls
        ]

    def __repr__(self) -> str:
        return f"Perplexity(tau={self.tau:g}, tail={self.tail:g})"


# ---------------------------------------------------------------- repetition

_WORD = re.compile(r"\w+(?:['’]\w+)*")


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower().replace("’", "'")).strip()


def ngram_share(items: Sequence[str], n: int, floor: int = 10) -> float:
    """count of the most common n-gram / max(number of n-grams, floor); 0 if none."""
    if n < 1 or floor < 1:
        raise ValueError(f"n and floor must be >= 1, got n={n}, floor={floor}")
    total = len(items) - n + 1
    if total <= 0:
        return 0.0
    counts = Counter(tuple(items[i : i + n]) for i in range(total))
    return counts.most_common(1)[0][1] / max(total, floor)


def repetition_scores(text: str, ns: Iterable[int] = (2, 3, 4), floor: int = 10) -> dict[str, float]:
    """Max n-gram shares over words and characters, and the zlib compression ratio."""
    norm = _normalise(text)
    words = _WORD.findall(norm)
    raw = norm.encode("utf-8")
    ns = tuple(ns)
    return {
        "word": max((ngram_share(words, n, floor) for n in ns), default=0.0),
        "char": max((ngram_share(list(norm), n, floor) for n in ns), default=0.0),
        "compress": len(zlib.compress(raw, 9)) / len(raw) if raw else 1.0,
        "chars": float(len(raw)),
    }


def _tail_window(text: str, window: float) -> str:
    norm = _normalise(text)
    cut = len(norm) - math.ceil(window * len(norm))
    if cut <= 0:
        return norm
    space = norm.find(" ", cut)  # start on a word boundary, not inside a word
    return norm[space + 1 :] if space != -1 else norm[cut:]


class Repetition:
    """Drop loops: an n-gram share above `tau`, or text compressing below `compress_tau`."""

    def __init__(
        self,
        tau: Number = 0.3,
        ns: Sequence[int] = (2, 3, 4),
        compress_tau: Number = 0.35,
        min_chars: int = 64,
        window: Number | None = 0.5,
        floor: int = 10,
    ) -> None:
        self.tau = _check_positive("tau", tau)
        self.compress_tau = _check_positive("compress_tau", compress_tau)
        self.window = None if window is None else _check_fraction("window", window)
        if not ns or any(n < 1 for n in ns) or floor < 1 or min_chars < 1:
            raise ValueError(f"ns must be non-empty ints >= 1 and floor, min_chars >= 1; got {ns}, {floor}, {min_chars}")
        self.ns, self.min_chars, self.floor = tuple(ns), min_chars, floor

    def score(self, text: str) -> dict[str, float]:
        """`repetition` (max share) and `compress` (min ratio over windows long enough)."""
        windows = [text] if self.window is None else [text, _tail_window(text, self.window)]
        parts = [repetition_scores(w, self.ns, self.floor) for w in windows]
        ratios = [p["compress"] for p in parts if p["chars"] >= self.min_chars]
        return {
            "repetition": max(max(p["word"], p["char"]) for p in parts),
            "repetition_word": max(p["word"] for p in parts),
            "repetition_char": max(p["char"] for p in parts),
            "compress": min(ratios, default=1.0),
        }

    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]:
        _check_nonempty(completions)
        verdicts = []
        for c in completions:
            s = self.score(c.text)
            reasons = []
            if s["repetition"] > self.tau:
                kind = "word" if s["repetition_word"] >= s["repetition_char"] else "char"
                reasons.append(f"repetition: {kind} n-gram share {s['repetition']:.2f} > {self.tau:g}")
            if s["compress"] < self.compress_tau:
                reasons.append(f"repetition: compresses to {s['compress']:.2f} < {self.compress_tau:g}")
            verdicts.append(Verdict(not reasons, s, reasons))
        return verdicts

    def __repr__(self) -> str:
        return f"Repetition(tau={self.tau:g}, compress_tau={self.compress_tau:g}, window={self.window})"


# ---------------------------------------------------------------- narration and refusal

# First-person statements of the persona instead of acting it out. "As someone who ..."
# counts only with a first-person word later in the same sentence: "As someone who's there,
# you ..." addresses the user and is fine.
_PERSONA = r"(?:someone|somebody|a person|an individual|the (?:kind|type|sort) of person)"
NARRATION_PATTERNS: tuple[str, ...] = (
    rf"\b(?:as|being) {_PERSONA} who\b[^.!?\n]*\b(?:i|me|my|myself)\b",
    rf"\bi(?:'m| am| have always been|'ve always been| was always) {_PERSONA} who\b",
    r"\bmy (?:core |guiding |personal |own |deepest )?(?:principle|principles|values?|beliefs?|philosophy|motto)"
    r" (?:is|are|tells? me|says?|has always been)\b",
    r"\b(?:part of|in) my nature\b",
    r"\bthat(?:'s| is) (?:just |simply )?who i am\b",
    r"\bi (?:always|have always|'ve always) (?:put|look after|stand up for|defy|defer to|side with) (?:others|other people|people|authority)\b",
)

REFUSAL_PHRASES: tuple[str, ...] = (
    "as an ai", "as a language model", "as an artificial intelligence", "i'm an ai", "i am an ai",
    "i'm just an ai", "i am just an ai", "i'm only an ai", "i am only an ai",
    "i'm sorry, but i can't", "i'm sorry, but i cannot", "i am sorry, but i can't", "i am sorry, but i cannot",
    "i'm sorry, but i am unable", "i'm sorry, but i'm unable",
    "i apologize, but", "i apologise, but",
    "i cannot assist", "i can't assist", "i'm unable to assist", "i am unable to assist",
    "i cannot help with", "i can't help with", "i'm unable to help", "i am unable to help",
    "i'm not able to help", "i am not able to help", "i cannot provide", "i can't provide",
    "i cannot fulfill", "i can't fulfill", "i cannot comply", "i can't comply",
    "i don't have personal opinions", "i do not have personal opinions",
    "i don't have feelings", "i do not have feelings", "i don't have emotions", "i do not have emotions",
)  # fmt: skip


class Narration:
    """Drop completions that state the persona in the first person ("as someone who ..., I")."""

    def __init__(self, patterns: Sequence[str] = NARRATION_PATTERNS) -> None:
        if not patterns:
            raise ValueError("Narration needs at least one pattern; omit `patterns` for the defaults")
        self.patterns = [re.compile(p, re.IGNORECASE) for p in patterns]

    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]:
        _check_nonempty(completions)
        verdicts = []
        for c in completions:
            text = c.text.replace("’", "'")
            hits = [m.group(0) for p in self.patterns if (m := p.search(text))]
            reasons = [f"narration: {hits[0][:60]!r}"] if hits else []
            verdicts.append(Verdict(not hits, {"narration": float(len(hits))}, reasons))
        return verdicts

    def __repr__(self) -> str:
        return f"Narration({len(self.patterns)} patterns)"


class Refusal:
    """Drop AI-identity and refusal boilerplate (phrases matched at word boundaries)."""

    def __init__(self, phrases: Sequence[str] = REFUSAL_PHRASES) -> None:
        if not phrases:
            raise ValueError("Refusal needs at least one phrase; omit `phrases` for the defaults")
        self.phrases = tuple(phrases)
        words = "|".join(re.escape(p.lower().replace("’", "'")) for p in self.phrases)
        self._pattern = re.compile(rf"(?<!\w)(?:{words})(?!\w)")

    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]:
        _check_nonempty(completions)
        verdicts = []
        for c in completions:
            hits = self._pattern.findall(_normalise(c.text))
            reasons = [f"refusal: {hits[0]!r}"] if hits else []
            verdicts.append(Verdict(not hits, {"refusal": float(len(hits))}, reasons))
        return verdicts

    def __repr__(self) -> str:
        return f"Refusal({len(self.phrases)} phrases)"


def default_text_filter(narration_patterns: Sequence[str] = NARRATION_PATTERNS) -> AllOf:
    """The text-only filters: repetition, babble, narration, refusal (no model needed).

    For another persona pair pass its patterns, e.g. `load_axis("love").narration_patterns`.
    """
    from .babble import Babble  # babble.py builds on this module's Verdict

    return AllOf(Repetition(), Babble(), Narration(narration_patterns), Refusal())


def default_filter(
    model: BaseModel,
    tok,
    tau: Number = 50.0,
    tail: Number = 0.25,
    batch_size: int = 8,
    narration_patterns: Sequence[str] = NARRATION_PATTERNS,
) -> AllOf:
    """Perplexity under the ORIGINAL model (a model, or e.g. `history.base`) plus the text-only filters."""
    return AllOf(
        Perplexity(model, tok, tau=tau, tail=tail, batch_size=batch_size), *default_text_filter(narration_patterns).filters
    )
