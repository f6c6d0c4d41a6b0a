"""Text-only filters: repetition (loops), narration of the persona, refusal boilerplate.

Repetition. For a token sequence s (words, or characters of the lower-cased,
whitespace-collapsed text) and n in {2, 3, 4}, with G_n the list of n-grams of s:

    share_n(s) = max_g count(g in G_n) / max(|G_n|, min_ngrams)

`min_ngrams` (default 10) keeps short texts, whose few n-grams are all "the most common",
from scoring high. `repetition` = max over words/chars and n; drop if > tau. A period-p
word loop scores 1/p, so long-period loops (a sentence repeated) need the compressibility
guard: `compress` = len(zlib(text)) / len(text), drop if < compress_tau (for windows of
at least `min_chars`). Both are taken over the whole text and over its last `window`
fraction, because steered loops typically start part-way and run to the length cap.

Narration and Refusal are regular expressions / phrases matched case-insensitively.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence

from ..errors import InputError
from ..steering.generation import Completion
from ..vocab import Number
from .base import Reason, Verdict, check_fraction, check_nonempty, check_positive

_WORD = re.compile(r"\w+(?:['’]\w+)*")


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower().replace("’", "'")).strip()


def ngram_share(items: Sequence[str], n: int, min_ngrams: int = 10) -> float:
    """count of the most common n-gram / max(number of n-grams, min_ngrams); 0 if none."""
    if n < 1 or min_ngrams < 1:
        raise InputError(f"n and min_ngrams must be >= 1, got n={n}, min_ngrams={min_ngrams}")
    total = len(items) - n + 1
    if total <= 0:
        return 0.0
    counts = Counter(tuple(items[i : i + n]) for i in range(total))
    return counts.most_common(1)[0][1] / max(total, min_ngrams)


def repetition_scores(text: str, ns: Iterable[int] = (2, 3, 4), min_ngrams: int = 10) -> dict[str, float]:
    """Max n-gram shares over words and characters, and the zlib compression ratio."""
    norm = _normalise(text)
    words = _WORD.findall(norm)
    raw = norm.encode("utf-8")
    ns = tuple(ns)
    return {
        "word": max((ngram_share(words, n, min_ngrams) for n in ns), default=0.0),
        "char": max((ngram_share(list(norm), n, min_ngrams) for n in ns), default=0.0),
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

    name = "repetition"

    def __init__(
        self,
        tau: Number = 0.3,
        ns: Sequence[int] = (2, 3, 4),
        compress_tau: Number = 0.35,
        min_chars: int = 64,
        window: Number | None = 0.5,
        min_ngrams: int = 10,
    ) -> None:
        self.tau = check_positive("tau", tau)
        self.compress_tau = check_positive("compress_tau", compress_tau)
        self.window = None if window is None else check_fraction("window", window)
        if not ns or any(n < 1 for n in ns) or min_ngrams < 1 or min_chars < 1:
            raise InputError(
                f"ns must be non-empty ints >= 1 and min_ngrams, min_chars >= 1; got {ns}, {min_ngrams}, {min_chars}"
            )
        self.ns, self.min_chars, self.min_ngrams = tuple(ns), min_chars, min_ngrams

    def score(self, text: str) -> dict[str, float]:
        """`repetition` (max share) and `compress` (min ratio over windows long enough)."""
        windows = [text] if self.window is None else [text, _tail_window(text, self.window)]
        parts = [repetition_scores(w, self.ns, self.min_ngrams) for w in windows]
        ratios = [p["compress"] for p in parts if p["chars"] >= self.min_chars]
        return {
            "repetition": max(max(p["word"], p["char"]) for p in parts),
            "repetition_word": max(p["word"] for p in parts),
            "repetition_char": max(p["char"] for p in parts),
            "compress": min(ratios, default=1.0),
        }

    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]:
        check_nonempty(completions)
        verdicts = []
        for c in completions:
            s = self.score(c.text)
            reasons = []
            if s["repetition"] > self.tau:
                kind = "word" if s["repetition_word"] >= s["repetition_char"] else "char"
                reasons.append(Reason(self.name, f"{kind} n-gram share {s['repetition']:.2f} > {self.tau:g}"))
            if s["compress"] < self.compress_tau:
                reasons.append(Reason(self.name, f"compresses to {s['compress']:.2f} < {self.compress_tau:g}"))
            verdicts.append(Verdict(not reasons, s, reasons))
        return verdicts

    def __repr__(self) -> str:
        return f"Repetition(tau={self.tau:g}, compress_tau={self.compress_tau:g}, window={self.window})"


# ------------------------------------------------------------------ narration and refusal

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
    "as an ai",
    "as a language model",
    "as an artificial intelligence",
    "i'm an ai",
    "i am an ai",
    "i'm just an ai",
    "i am just an ai",
    "i'm only an ai",
    "i am only an ai",
    "i'm sorry, but i can't",
    "i'm sorry, but i cannot",
    "i am sorry, but i can't",
    "i am sorry, but i cannot",
    "i'm sorry, but i am unable",
    "i'm sorry, but i'm unable",
    "i apologize, but",
    "i apologise, but",
    "i cannot assist",
    "i can't assist",
    "i'm unable to assist",
    "i am unable to assist",
    "i cannot help with",
    "i can't help with",
    "i'm unable to help",
    "i am unable to help",
    "i'm not able to help",
    "i am not able to help",
    "i cannot provide",
    "i can't provide",
    "i cannot fulfill",
    "i can't fulfill",
    "i cannot comply",
    "i can't comply",
    "i don't have personal opinions",
    "i do not have personal opinions",
    "i don't have feelings",
    "i do not have feelings",
    "i don't have emotions",
    "i do not have emotions",
)


class Narration:
    """Drop completions that state the persona in the first person ("as someone who ..., I").

    `patterns=None` uses `NARRATION_PATTERNS` (e.g. an axis file without its own).
    """

    name = "narration"

    def __init__(self, patterns: Sequence[str] | None = None) -> None:
        if patterns is None:
            patterns = NARRATION_PATTERNS
        if not patterns:
            raise InputError("Narration needs at least one pattern; pass None for the defaults")
        self.patterns = [re.compile(p, re.IGNORECASE) for p in patterns]

    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]:
        check_nonempty(completions)
        verdicts = []
        for c in completions:
            text = c.text.replace("’", "'")
            hits = [m.group(0) for p in self.patterns if (m := p.search(text))]
            reasons = [Reason(self.name, f"{hits[0][:60]!r}")] if hits else []
            verdicts.append(Verdict(not hits, {"narration": float(len(hits))}, reasons))
        return verdicts

    def __repr__(self) -> str:
        return f"Narration({len(self.patterns)} patterns)"


class Refusal:
    """Drop AI-identity and refusal boilerplate (phrases matched at word boundaries)."""

    name = "refusal"

    def __init__(self, phrases: Sequence[str] = REFUSAL_PHRASES) -> None:
        if not phrases:
            raise InputError("Refusal needs at least one phrase; omit `phrases` for the defaults")
        self.phrases = tuple(phrases)
        words = "|".join(re.escape(p.lower().replace("’", "'")) for p in self.phrases)
        self._pattern = re.compile(rf"(?<!\w)(?:{words})(?!\w)")

    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]:
        check_nonempty(completions)
        verdicts = []
        for c in completions:
            hits = self._pattern.findall(_normalise(c.text))
            reasons = [Reason(self.name, f"{hits[0]!r}")] if hits else []
            verdicts.append(Verdict(not hits, {"refusal": float(len(hits))}, reasons))
        return verdicts

    def __repr__(self) -> str:
        return f"Refusal({len(self.phrases)} phrases)"
