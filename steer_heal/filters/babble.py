"""Word salad that shows in the text itself, without a model.

Steered models past the coherent dose lose grammar before they lose fluency: closed-class
words (articles, prepositions, auxiliaries) thin out or land in impossible places,
sentences stop ending, words fuse, and the output wanders into symbols or other scripts.
Perplexity under the original model catches most of this too, but costs a forward pass;
these scores are free. With W the words of a text (letters, inner apostrophes and
hyphens; `n = |W|`) and C its non-space characters:

    function_share = |{w in W : w in FUNCTION_WORDS}| / n           drop if < min_function_share
    punct_share    = |{c in C : c not a letter or digit}| / |C|     drop if > max_punct_share
    non_ascii      = |{w in W : w has a non-ASCII letter}| / n      drop if > max_non_ascii
    slips          = #{(a, b) adjacent in W : (a, b) in an impossible class pair}
                     (determiner then preposition / determiner / auxiliary, or preposition
                     then auxiliary: "the of", "a the", "for is")  drop if >= max_slips
    sentence_words = n / (sentence ends + 1 if the text ends mid-sentence)
                     (an end is . ! ? or a line break after text) drop if > max_sentence_words

English prose sits near 0.45-0.55 function words, 0.02-0.06 punctuation and 10-20 words a
sentence (the coherent items of `tests/data/filter_labels.jsonl`: 0.33-0.56, <= 0.06,
<= 20). The word-based rules need at least `min_words` words, since a short reply can be
all nouns. Fluent but off-topic drift ("a new team building at the edge of the world") is
beyond any text rule; that is what the perplexity filter and the evaluation are for.

The defaults are for English; set `max_non_ascii=None` (or any threshold to None) to turn
a rule off, e.g. when steering toward another language.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import InputError
from ..steering.generation import Completion
from .base import Reason, Verdict, check_nonempty

DETERMINERS = frozenset("the a an every each my your our their".split())
PREPOSITIONS = frozenset(
    "of in on at for from with by about into onto over under after before between through during without within upon".split()
)
AUXILIARIES = frozenset("is are was were am been shall will would can could may might must should".split())
FUNCTION_WORDS = (
    DETERMINERS
    | PREPOSITIONS
    | AUXILIARIES
    | frozenset(
        """a an the this that these those his her its some any no all both
    to as than and or but nor so yet if because while although though when where whether
    i you he she it we they me him us them myself yourself
    be being do does did have has had not there here what which who whom whose how why
    more most very too just also only then now""".split()
    )
)
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]’”]*(?=\s|$)|\S\s*\n")
_ENDS_CLEANLY = re.compile(r"[.!?][\"')\]’”]*\s*$")


def _is_slip(a: str, b: str) -> bool:
    return (a in DETERMINERS and (b in PREPOSITIONS or b in DETERMINERS or b in AUXILIARIES)) or (
        a in PREPOSITIONS and b in AUXILIARIES
    )


def babble_scores(text: str) -> dict[str, float]:
    """The word count n (`babble_words`) and the five scores of the module docstring (0 for an empty text)."""
    words = [w.lower() for w in _WORD.findall(text)]
    chars = [c for c in text if not c.isspace()]
    n = max(len(words), 1)
    ends = len(_SENTENCE_END.findall(text.strip())) + (0 if _ENDS_CLEANLY.search(text) or not words else 1)
    return {
        "babble_words": float(len(words)),  # prefixed: AllOf refuses two filters writing one key
        "function_share": sum(w in FUNCTION_WORDS for w in words) / n,
        "punct_share": sum(not c.isalnum() for c in chars) / max(len(chars), 1),
        "non_ascii": sum(any(ord(c) > 127 for c in w) for w in words) / n,
        "slips": float(sum(_is_slip(a, b) for a, b in zip(words, words[1:]))),
        "sentence_words": len(words) / max(ends, 1),
    }


class Babble:
    """Drop word salad by the text's grammar: thin function words, slips, run-ons, symbols."""

    name = "babble"

    def __init__(
        self,
        min_function_share: float | None = 0.30,
        max_punct_share: float | None = 0.20,
        max_non_ascii: float | None = 0.15,
        max_slips: int | None = 2,
        max_sentence_words: float | None = 28.0,
        min_words: int = 8,
    ) -> None:
        for name, value in [
            ("min_function_share", min_function_share),
            ("max_punct_share", max_punct_share),
            ("max_non_ascii", max_non_ascii),
        ]:
            if value is not None and not 0 <= value <= 1:
                raise InputError(f"{name} is a share in [0, 1] (or None to turn it off), got {value}")
        for name, value in [
            ("max_slips", max_slips),
            ("max_sentence_words", max_sentence_words),
            ("min_words", min_words),
        ]:
            if value is not None and value < 1:
                raise InputError(f"{name} must be >= 1 (or None to turn it off), got {value}")
        self.min_function_share, self.max_punct_share, self.max_non_ascii = (
            min_function_share,
            max_punct_share,
            max_non_ascii,
        )
        self.max_slips, self.max_sentence_words, self.min_words = max_slips, max_sentence_words, min_words

    def reasons(self, s: dict[str, float]) -> list[Reason]:
        out = []
        if self.max_punct_share is not None and s["punct_share"] > self.max_punct_share:
            out.append(Reason(self.name, f"punctuation share {s['punct_share']:.2f} > {self.max_punct_share:g}"))
        if self.max_non_ascii is not None and s["non_ascii"] > self.max_non_ascii:
            out.append(Reason(self.name, f"non-ASCII word share {s['non_ascii']:.2f} > {self.max_non_ascii:g}"))
        if self.max_slips is not None and s["slips"] >= self.max_slips:
            out.append(Reason(self.name, f"{s['slips']:.0f} impossible word pairs (e.g. 'the of') >= {self.max_slips}"))
        if s["babble_words"] < self.min_words:
            return out  # too short for the share and sentence rules to mean anything
        if self.min_function_share is not None and s["function_share"] < self.min_function_share:
            out.append(
                Reason(self.name, f"function-word share {s['function_share']:.2f} < {self.min_function_share:g}")
            )
        if self.max_sentence_words is not None and s["sentence_words"] > self.max_sentence_words:
            out.append(Reason(self.name, f"{s['sentence_words']:.0f} words per sentence > {self.max_sentence_words:g}"))
        return out

    def __call__(self, completions: Sequence[Completion]) -> list[Verdict]:
        check_nonempty(completions)
        verdicts = []
        for c in completions:
            s = babble_scores(c.text)
            reasons = self.reasons(s)
            verdicts.append(Verdict(not reasons, s, reasons))
        return verdicts

    def __repr__(self) -> str:
        return (
            f"Babble(function>={self.min_function_share}, punct<={self.max_punct_share}, non_ascii<={self.max_non_ascii}, "
            f"slips<{self.max_slips}, sentence<={self.max_sentence_words})"
        )
