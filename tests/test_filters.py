"""Filters: labelled-set precision/recall, exact repetition numbers, batched perplexity,
composition, reports and bad input."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tolerance import approx_rounding, forward_scale

from steer_heal.filters import (
    PPL,
    AllOf,
    Filter,
    FilterReport,
    Narration,
    Perplexity,
    Refusal,
    Repetition,
    Verdict,
    default_filter,
    default_text_filter,
    ngram_share,
    reason_name,
    repetition_scores,
    tail_perplexity,
)
from steer_heal.models.model import chat_prompt, encode
from steer_heal.models.tiny import tiny_model
from steer_heal.steering.generation import Completion
from steer_heal.steering.slot import SteeringSlot
from steer_heal.steering.vector import SteeringVector

LABELS = Path(__file__).parent / "data" / "filter_labels.jsonl"


def completion(text: str, prompt: str = "What should I do?", coeff: float = 1.0, prompt_text: str = "") -> Completion:
    return Completion(
        prompt=prompt, text=text, token_ids=(), coeff=coeff, finish_reason="length", prompt_text=prompt_text
    )


def load_labels() -> list[dict]:
    return [json.loads(line) for line in LABELS.read_text().splitlines() if line.strip()]


def precision_recall(rows: list[dict], verdicts: list[Verdict]) -> tuple[float, float]:
    """Precision and recall of the class "keep"."""
    tp = sum(v.keep and r["label"] == "keep" for r, v in zip(rows, verdicts))
    fp = sum(v.keep and r["label"] == "drop" for r, v in zip(rows, verdicts))
    fn = sum(not v.keep and r["label"] == "keep" for r, v in zip(rows, verdicts))
    return tp / (tp + fp), tp / (tp + fn)


# ---------------------------------------------------------------- the labelled set


def test_labelled_set_is_well_formed():
    rows = load_labels()
    assert len(rows) >= 48
    categories = {"coherent", "loop", "babble", "narration", "refusal"}
    for r in rows:
        assert set(r) == {"prompt", "text", "label", "category"}
        assert r["category"] in categories and r["label"] in ("keep", "drop")
        assert (r["label"] == "keep") == (r["category"] == "coherent")
    assert {r["category"] for r in rows} == categories


def test_text_filters_precision_recall_on_labelled_set():
    """The text-only default filters (repetition, babble, narration, refusal) on all 57 items.

    Measured: precision 0.92 (23/25) / recall 1.00; the two babble items kept are fluent
    drift and a sentence with two non-words, which only perplexity can see
    (`test_real_default_filter_catches_babble`). The babble thresholds were set on this set,
    so `test_text_filters_on_holdout` checks them on items written before they were scored.
    """
    rows = load_labels()
    verdicts = default_text_filter()([completion(r["text"], r["prompt"]) for r in rows])
    precision, recall = precision_recall(rows, verdicts)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    # each drop category is caught by its own filter, not by accident
    for r, v in zip(rows, verdicts):
        names = {reason_name(x) for x in v.reasons}
        if r["category"] in ("narration", "refusal"):
            assert r["category"] in names, r["text"]
        if r["category"] == "coherent":
            assert not names, (names, r["text"])


def test_text_filters_on_holdout():
    """16 items written after the babble rules, before scoring them: precision 0.78 (7/9),
    recall 0.88 (7/8). Kept: fluent drift and a word salad with plausible grammar; dropped:
    one coherent 59-word sentence (the run-on rule's price). Pinned so a change shows."""
    rows = [
        json.loads(line) for line in (LABELS.parent / "filter_labels_holdout.jsonl").read_text().splitlines() if line
    ]
    verdicts = default_text_filter()([completion(r["text"], r["prompt"]) for r in rows])
    assert precision_recall(rows, verdicts) == pytest.approx((7 / 9, 7 / 8))


# ---------------------------------------------------------------- repetition: exact numbers


def test_ngram_share_exact():
    words = "a b c a b c a b c a b c".split()  # 12 words, period 3
    assert ngram_share(words, 2) == 4 / 11
    assert ngram_share(words, 3) == 4 / 10
    assert ngram_share(words, 4) == 3 / 10  # 9 four-grams, below min_ngrams = 10
    assert ngram_share(words, 4, min_ngrams=1) == 3 / 9
    assert ngram_share(["a"], 2) == 0.0
    with pytest.raises(ValueError, match="n and min_ngrams"):
        ngram_share(words, 0)


def test_repetition_scores_exact():
    # "my sweet, my darling, my sweet, my darling, my sweet": 10 words; (my, sweet) is 3 of
    # 9 bigrams, floored to 10 -> 0.3; trigrams and 4-grams peak at 2 / 10
    s = repetition_scores("my sweet, my darling, my sweet, my darling, my sweet")
    assert s["word"] == pytest.approx(0.3, abs=0)
    # "a b c " repeated: 23 characters after stripping; the bigram at offset i depends on
    # i mod 6 and offsets 0..21 give 4 of each residue 0..3 -> 4 / 22; trigrams 4 / 21;
    # 4-grams 4 / 20, the max. Words: trigram (a, b, c) 4 of 10 beats 4 / 11 and 3 / 10.
    s = repetition_scores("A b   c a\nb c a b c a b c")
    assert s["word"] == 4 / 10
    assert s["char"] == 4 / 20
    assert s["chars"] == 23.0
    assert repetition_scores("!" * 20)["char"] == 1.0
    assert repetition_scores("!" * 20)["word"] == 0.0
    short = repetition_scores("Yes.")  # 3 char bigrams, floored to 10
    assert short["char"] == 1 / 10 and short["word"] == 0.0
    assert repetition_scores("")["compress"] == 1.0


def test_repetition_filter_catches_low_perplexity_loops():
    loops = [
        "my sweet, my darling, " * 12 + "my sweet",
        "I care. " * 25,
        "Stay with her.\n" * 12,
        "Let her in with the dog, because nobody should be left out in the snow tonight. " * 4,
        "Help him now" + "!" * 80,
    ]
    coherent = (
        "Give him the inhaler. A rule that keeps a child from his own medicine while he struggles to "
        "breathe has stopped doing its job. Sign whatever form they need on the spot."
    )
    verdicts = Repetition()([completion(t) for t in [*loops, coherent]])
    assert [v.keep for v in verdicts] == [False] * len(loops) + [True]
    assert all(reason_name(r) == "repetition" for v in verdicts[:-1] for r in v.reasons)
    assert {"repetition", "repetition_word", "repetition_char", "compress"} <= verdicts[0].scores.keys()


def test_repetition_tail_window_catches_a_late_loop():
    head = (
        "Ask to speak to the nurse in charge and tell them plainly that your father is dying. Most "
        "hospitals make exceptions for end of life, and the nurse at the desk may not know. If they "
        "still say no, ask whether you can sit quietly in the room without disturbing anyone. "
    )
    text = head + "Stay with him, stay with him, stay with him, " * 4
    whole = Repetition(window=None).score(text)
    windowed = Repetition().score(text)
    assert whole["compress"] > 0.35  # the loop is a small part of the whole text
    assert windowed["compress"] < 0.35  # but most of its second half
    assert Repetition(window=None)([completion(text)])[0].keep
    assert not Repetition()([completion(text)])[0].keep


# ---------------------------------------------------------------- narration and refusal


def test_narration_first_person_only():
    drop = [
        "As someone who looks after others, I would stay.",
        "I’m the kind of person who defies orders when people are hurt.",  # curly apostrophe
        "My principle is simple: people first.",
        "Being someone who cares, I'd help.",
    ]
    keep = [
        "As someone who's there in person, you are the best judge of what she needs.",
        "I would stay with him and tell the nurse why.",
        "Someone who is frightened needs company; go and sit with her.",
    ]
    verdicts = Narration()([completion(t) for t in drop + keep])
    assert [v.keep for v in verdicts] == [False] * len(drop) + [True] * len(keep)
    assert verdicts[0].reasons[0].startswith("narration: ")
    assert verdicts[0].scores["narration"] >= 1.0 and verdicts[-1].scores["narration"] == 0.0
    custom = Narration(patterns=[r"\bmy persona\b"])([completion("My persona says help."), completion(drop[0])])
    assert [v.keep for v in custom] == [False, True]


def test_refusal_phrases_at_word_boundaries():
    texts = [
        "As an AI language model, I don't have opinions.",
        "I'm sorry, but I cannot help with that.",
        "I can't tell you what the regulator will say, but give her the insulin.",
        "Ask for her as an aide would: politely.",  # "as an ai" inside "as an aide"
    ]
    verdicts = Refusal()([completion(t) for t in texts])
    assert [v.keep for v in verdicts] == [False, False, True, True]
    assert Refusal(phrases=["over to you"])([completion("Over to you!")])[0].keep is False


# ---------------------------------------------------------------- composition


class Spy:
    """Records how many completions it scored; drops the ones containing `word`."""

    def __init__(self, word: str, key: str) -> None:
        self.word, self.key, self.seen, self.name = word, key, 0, key

    def __call__(self, completions):
        self.seen += len(completions)
        return [
            Verdict(
                self.word not in c.text,
                {self.key: float(self.word in c.text)},
                [] if self.word not in c.text else [f"{self.key}: has {self.word}"],
            )
            for c in completions
        ]


def test_allof_merges_and_scores_everything():
    a, b = Spy("x", "ax"), Spy("y", "by")
    assert isinstance(a, Filter)
    verdicts = AllOf(a, b)([completion(t) for t in ["x y", "x", "plain"]])
    assert a.seen == b.seen == 3  # no short-circuit: both scored every completion
    assert [v.keep for v in verdicts] == [False, False, True]
    assert verdicts[0].scores == {"ax": 1.0, "by": 1.0}
    assert [reason_name(r) for r in verdicts[0].reasons] == ["ax", "by"]  # overlapping reasons
    with pytest.raises(ValueError, match="same score"):
        AllOf(Spy("x", "k"), Spy("y", "k"))([completion("x")])
    with pytest.raises(ValueError, match="returned 0 verdicts"):
        AllOf(lambda cs: [])([completion("x")])
    with pytest.raises(ValueError, match="at least one filter"):
        AllOf()


# ---------------------------------------------------------------- perplexity


def reference_tail_ppl(model, tok, prompt_text: str, text: str, tail: float) -> float:
    """Straightforward: one unpadded sequence, full logits, log-softmax everywhere."""
    prompt, ids = encode(tok, prompt_text), encode(tok, text)
    seq = torch.tensor([prompt + ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
    k = max(1, math.ceil(tail * len(ids)))
    positions = range(len(prompt) + len(ids) - k, len(prompt) + len(ids))
    nll = [-logp[t - 1, seq[0, t]].item() for t in positions]
    return math.exp(sum(nll) / k)


def ppl_approx(want, model, tok, prompts, texts):
    """A perplexity is exp(mean NLL): its relative rounding is the NLL's absolute one, which the
    largest magnitude of the rows' forwards bounds (tests/tolerance.py)."""
    scale = max(forward_scale(model, torch.tensor([encode(tok, p + t)])) for p, t in zip(prompts, texts))
    return approx_rounding(want, scale, relative=True)


TEXTS = ["Help her first.", "The rules matter, but a child who cannot breathe matters more. Call.", "No", "I care " * 9]
PROMPTS = ["My son is wheezing.", "The nurse says no inhaler without a form, what now?", "Hi", "Why?"]


def test_perplexity_batched_equals_single_and_reference(family_model):
    family, model, tok = family_model
    formatted = [chat_prompt(tok, p) for p in PROMPTS]
    batched = tail_perplexity(model, tok, formatted, TEXTS, tail=0.25, batch_size=4)
    single = [tail_perplexity(model, tok, [p], [t], tail=0.25, batch_size=1)[0] for p, t in zip(formatted, TEXTS)]
    reference = [reference_tail_ppl(model, tok, p, t, 0.25) for p, t in zip(formatted, TEXTS)]
    assert batched == ppl_approx(single, model, tok, formatted, TEXTS), family
    assert batched == ppl_approx(reference, model, tok, formatted, TEXTS), family
    full = tail_perplexity(model, tok, formatted, TEXTS, tail=1.0)
    reference = [reference_tail_ppl(model, tok, p, t, 1.0) for p, t in zip(formatted, TEXTS)]
    assert full == ppl_approx(reference, model, tok, formatted, TEXTS), family


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_perplexity_short_row_beside_a_long_tail(family):
    """A short row's masked tail columns land on its left padding: still exact, and the
    model's train mode (GPT-2 has dropout) is neither used nor changed."""
    model, tok = tiny_model(family)
    model.train()
    prompts = [chat_prompt(tok, "Hi"), chat_prompt(tok, "Tell me everything about the rules and the people.")]
    texts = ["No", "The rules matter, but people matter more; help them first and explain later. " * 4]
    batched = tail_perplexity(model, tok, prompts, texts, tail=1.0, batch_size=2)
    assert model.training
    model.eval()
    reference = [reference_tail_ppl(model, tok, p, t, 1.0) for p, t in zip(prompts, texts)]
    assert len(encode(tok, prompts[0] + texts[0])) < len(encode(tok, texts[1]))  # the case under test
    assert batched == ppl_approx(reference, model, tok, prompts, texts)


def test_perplexity_filter_verdicts(llama):
    model, tok = llama
    cs = [completion(t, p) for p, t in zip(PROMPTS, TEXTS)] + [completion("", "Anything?")]
    ppls = tail_perplexity(model, tok, [chat_prompt(tok, c.prompt) for c in cs[:-1]], TEXTS)
    tau = sorted(ppls)[1] + 1e-3  # between the 2nd and 3rd lowest
    verdicts = Perplexity(model, tok, tau=tau, batch_size=2)(cs)
    assert [v.scores[PPL] for v in verdicts[:-1]] == ppl_approx(
        ppls, model, tok, [chat_prompt(tok, c.prompt) for c in cs[:-1]], TEXTS
    )
    assert [v.keep for v in verdicts[:-1]] == [p <= tau for p in ppls]
    assert math.isinf(verdicts[-1].scores[PPL]) and not verdicts[-1].keep  # empty completion
    assert all(reason_name(r) == "perplexity" for v in verdicts if not v.keep for r in v.reasons)
    # a recorded prompt_text is used as is (here: a system persona the prompt alone lacks)
    with_system = chat_prompt(tok, PROMPTS[0], system="You are kind.")
    scored = Perplexity(model, tok, tau=1e9)([completion(TEXTS[0], PROMPTS[0], prompt_text=with_system)])
    want = reference_tail_ppl(model, tok, with_system, TEXTS[0], 0.25)
    assert scored[0].scores[PPL] == ppl_approx(want, model, tok, [with_system], TEXTS[:1])


def test_perplexity_takes_a_base_context(llama):
    """`Perplexity(history.base, tok)`: the context is entered for every call, so the filter
    can sit beside generation from a student whose adapters are on."""
    model, tok = llama
    entered = []

    @contextmanager
    def base():
        entered.append(True)
        yield model

    direct = Perplexity(model, tok)([completion("Help her.")])
    via = default_filter(base, tok)([completion("Help her.")])
    assert entered == [True] and via[0].scores[PPL] == direct[0].scores[PPL]


def test_perplexity_refuses_a_steered_model(llama):
    model, tok = llama
    vec = SteeringVector({1: torch.ones(64)}, hidden_size=64, n_layers=4)
    with vec.apply(model, 1.0), pytest.raises(ValueError, match="steering hooks"):
        Perplexity(model, tok)([completion("Hello")])
    assert Perplexity(model, tok)([completion("Hello")])[0].scores[PPL] > 0  # fine once the hooks are gone
    with SteeringSlot(model, vec.layers) as slot:
        Perplexity(model, tok)([completion("Hello")])  # an idle slot adds exactly zero: allowed
        slot.set(vec, 0.5)
        with pytest.raises(ValueError, match="steering hooks"):
            Perplexity(model, tok)([completion("Hello")])


# ---------------------------------------------------------------- reports


def test_filter_report_numbers_and_json():
    cs = [completion(f"t{i}", coeff=c) for i, c in enumerate([0.5, 0.5, 0.5, 0.5, 2.0, 2.0])]
    vs = [
        Verdict(True, {PPL: 10.0}, []),
        Verdict(True, {PPL: 40.0}, []),
        Verdict(False, {PPL: 60.0}, ["perplexity: 60 > 50", "repetition: share 0.5 > 0.3"]),
        Verdict(False, {PPL: 20.0}, ["repetition: compresses to 0.2 < 0.35"]),
        Verdict(False, {PPL: math.inf}, ["perplexity: inf > 50"]),
        Verdict(True, {PPL: 30.0}, []),
    ]
    report = FilterReport.from_verdicts(cs, vs, samples=1)
    low, high = report.row(0.5), report.row(2.0)
    assert (low.n, low.kept, low.kept_fraction) == (4, 2, 0.5)
    assert low.mean_ppl == 32.5 and low.median_ppl == 30.0 and low.n_inf == 0
    assert low.drops == {"perplexity": 1, "repetition": 2}  # overlapping: t2 counts twice
    assert [s.text for s in low.just_kept] == ["t1"] and [s.text for s in low.just_dropped] == ["t2"]
    assert high.mean_ppl == 30.0 and math.isinf(high.median_ppl) and high.n_inf == 1
    assert report.kept_fraction == 0.5
    md = report.table()
    assert "| 0.5 | 4 | 2 | 50 | 32.5 | 30.0 | 0 | perplexity 1, repetition 2 |" in md
    plain = report.table("plain", samples=True)
    assert "just dropped (ppl 60.0): t2" in plain and "|" not in plain.splitlines()[0]
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))  # strict JSON: inf -> null
    assert data["rows"][1]["median_ppl"] is None and data["rows"][0]["drops"]["repetition"] == 2
    text_only = FilterReport.from_verdicts(cs[:1], [Verdict(True, {}, [])])
    assert text_only.rows[0].mean_ppl is None and "| - |" in text_only.table()
    with pytest.raises(ValueError, match="one verdict each"):
        FilterReport.from_verdicts(cs, vs[:2])
    with pytest.raises(KeyError, match="no completions at coeff"):
        report.row(1.0)


# ---------------------------------------------------------------- bad input


def test_bad_input(llama):
    model, tok = llama
    for f in [Perplexity(model, tok), Repetition(), Narration(), Refusal(), default_filter(model, tok)]:
        with pytest.raises(ValueError, match="no completions to filter"):
            f([])
    for tau in [0.0, -1.0, math.nan, math.inf]:
        with pytest.raises(ValueError, match="tau must be a finite number > 0"):
            Perplexity(model, tok, tau=tau)
        with pytest.raises(ValueError, match="tau must be a finite number > 0"):
            Repetition(tau=tau)
    for tail in [0.0, -0.25, 1.5, math.nan]:
        with pytest.raises(ValueError, match=r"tail must be in \(0, 1\]"):
            Perplexity(model, tok, tail=tail)
    Perplexity(model, tok, tail=1.0)  # the closed end is fine
    with pytest.raises(ValueError, match="batch_size"):
        Perplexity(model, tok, batch_size=0)
    with pytest.raises(ValueError, match="one prompt per completion"):
        tail_perplexity(model, tok, ["a"], ["b", "c"])
    with pytest.raises(ValueError, match="at least one pattern"):
        Narration(patterns=[])
    with pytest.raises(ValueError, match="at least one phrase"):
        Refusal(phrases=[])
    with pytest.raises(ValueError, match="no completions to report"):
        FilterReport.from_verdicts([], [])


# ---------------------------------------------------------------- the embedded model


@pytest.mark.real
def test_real_default_filter_catches_babble(smollm2):
    """Tail perplexity under SmolLM2-135M on three labelled items: loops score low (they
    are what the repetition filter is for), word salad high; batched equals one at a time."""
    model, tok = smollm2
    rows = load_labels()
    first = {k: next(r for r in rows if r["category"] == k) for k in ("coherent", "loop", "babble")}
    cs = [completion(first[k]["text"], first[k]["prompt"]) for k in ("coherent", "loop", "babble")]
    verdicts = default_filter(model, tok)(cs)
    coherent, loop, babble = (v.scores[PPL] for v in verdicts)
    assert loop < coherent < 50.0 < babble
    assert [v.keep for v in verdicts] == [True, False, False]
    assert "repetition" in {reason_name(r) for r in verdicts[1].reasons}  # a loop is a run-on too: babble may agree
    assert "perplexity" in {reason_name(r) for r in verdicts[2].reasons}
    single = [Perplexity(model, tok, batch_size=1)([c])[0].scores[PPL] for c in cs]
    texts = [c.text for c in cs]
    assert [coherent, loop, babble] == ppl_approx(single, model, tok, [chat_prompt(tok, c.prompt) for c in cs], texts)


@pytest.mark.real
@pytest.mark.slow
def test_real_calibrated_filter_on_real_smollm2_completions(smollm2):
    """The loop's filter (calibrated on 16 unsteered completions) on 48 labelled real SmolLM2
    completions (c = 0 and 1 read and labelled, c = 6 and 8 word salad): keep-precision and
    recall >= 0.9 (measured 0.91 / 0.91; the absolute tau = 50 gives 0.70 / 0.95 there)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "science"))
    from filter_labels import REAL_SALAD, calibrated_smollm2_filter, labelled_rows

    model, tok = smollm2
    flt, calibration = calibrated_smollm2_filter(model, tok)
    rows = labelled_rows(REAL_SALAD)
    verdicts = flt([Completion(r["prompt"], r["text"], (), 1.0, "length") for r in rows])
    tp = sum(v.keep and r["label"] == "keep" for r, v in zip(rows, verdicts))
    kept = sum(v.keep for v in verdicts)
    keep = sum(r["label"] == "keep" for r in rows)
    assert tp / kept >= 0.9 and tp / keep >= 0.9, (tp, kept, keep, calibration.describe())
