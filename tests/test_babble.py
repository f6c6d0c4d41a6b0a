"""Babble: exact scores on synthetic texts, each rule on its own, thresholds off, bad input."""

import pytest

from steer_heal.filters import reason_name
from steer_heal.filters.babble import Babble, babble_scores
from steer_heal.steering.generation import Completion


def verdict(text: str, **kwargs):
    return Babble(**kwargs)([Completion("p", text, (), 1.0, "length")])[0]


def test_scores_exact():
    s = babble_scores("The cat sat on the mat. It was warm!")
    # words: the cat sat on the mat it was warm -> function words: the, on, the, it, was
    assert s["babble_words"] == 9 and s["function_share"] == 5 / 9
    assert s["punct_share"] == 2 / 28  # '.' and '!' of 28 non-space characters
    assert s["sentence_words"] == 9 / 2 and s["slips"] == 0 and s["non_ascii"] == 0
    # an unfinished last sentence counts as one; a line break ends a sentence
    assert babble_scores("One two three. Four five")["sentence_words"] == 5 / 2
    assert babble_scores("- one item\n- another item")["sentence_words"] == 4 / 2
    # hyphens and apostrophes stay inside words; "the of" and "for is" are slips
    assert babble_scores("the on-call nurse's shift")["babble_words"] == 4
    assert babble_scores("insulin for is the of the river")["slips"] == 2
    assert babble_scores("café naïve tea")["non_ascii"] == 2 / 3
    assert babble_scores("")["babble_words"] == 0


@pytest.mark.parametrize(
    "text, rule",
    [
        (
            "great face wide nature moment great skin hard hand face wood birth very great love smile early mother",
            "function-word",
        ),
        ("care() { return help; } // ### >>>", "punctuation"),
        ("très gentille, à la soirée", "non-ASCII"),
        ("The nurse for is the of the ward and she was kind to the patient today.", "impossible word pairs"),
        (
            "the nurse said that the rule was there for a reason but that the woman was cold and that "
            "the dog was wet and that the night was long and that she would stay with her",
            "words per sentence",
        ),
    ],
)
def test_each_rule_fires_alone(text, rule):
    v = verdict(text)
    assert not v.keep and len(v.reasons) == 1 and rule in v.reasons[0] and reason_name(v.reasons[0]) == "babble"


def test_coherent_text_and_short_replies_pass():
    assert verdict(
        "Stay with her. Tell the nurse that she is frightened, and ask if you can sit with her a while."
    ).keep
    assert verdict("Call an ambulance now.").keep  # 4 words: too short for the share rules


def test_rules_turn_off():
    salad = "great face wide nature moment great skin hard hand face wood birth very great love smile early mother"
    assert verdict(salad, min_function_share=None).keep
    assert verdict(salad, min_words=100).keep  # below min_words only the character rules apply


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_function_share": 1.5}, "min_function_share is a share"),
        ({"max_non_ascii": -0.1}, "max_non_ascii"),
        ({"max_slips": 0}, "max_slips must be >= 1"),
        ({"min_words": 0}, "min_words"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Babble(**kwargs)


def test_empty_list():
    with pytest.raises(ValueError):
        Babble()([])
