"""Evaluation of every stage on the same items (docs/method.md, step 6).

- `AnswerLogOdds`: the trait as answer log-odds on held-out scenarios, stance and wording
  apart, with an off-axis control (the probe a small model can answer);
- `Vignettes`: forced-choice moral-foundations probe (nats per foundation + coherence);
- `TraitJudge`: the trait in free text, scored with a small sentence-embedding model;
- `HeldOutPerplexity`, `Samples`: fluency on neutral text and greedy samples for the report;
- `NeutralDrift`: how far a student drifted from the base on neutral prompts (NeutralKL,
  RegisterShift AUC, the base's perplexity of the student's text), with `DriftControls`;
- `compare`, `stage_table`: paired deltas and a verdict that checks coherence first.

Evaluators run the model they are given; steer or bake around the call.
"""

from .base import EvalResult, Evaluator, min_coherence
from .compare import BROKEN_BELOW, Comparison, compare, stage_table
from .drift import NEGATIVE_AUC, POSITIVE_AUC, DriftControls, NeutralDrift, neutral_kl, register_shift
from .items import (
    FOUNDATIONS,
    Vignette,
    canonical_foundation,
    fingerprint,
    foundation_key,
    load_mfv,
    load_vignettes,
    stratified_subset,
)
from .judge import INSTALL_HINT, JudgeAxis, TraitJudge, bootstrap_ci, load_judge_axes
from .logodds import AnswerLogOdds, AnswerPair, OffAxisPair, Shift, retain, shift, shift_table
from .text import HeldOutPerplexity, Samples, load_paragraphs
from .vignettes import LABELS, WORDINGS, Vignettes, Wording, option_token_ids

__all__ = [
    "NEGATIVE_AUC",
    "POSITIVE_AUC",
    "DriftControls",
    "NeutralDrift",
    "neutral_kl",
    "register_shift",
    "AnswerLogOdds",
    "AnswerPair",
    "OffAxisPair",
    "Shift",
    "retain",
    "shift",
    "shift_table",
    "BROKEN_BELOW",
    "FOUNDATIONS",
    "INSTALL_HINT",
    "LABELS",
    "WORDINGS",
    "Comparison",
    "EvalResult",
    "Evaluator",
    "JudgeAxis",
    "HeldOutPerplexity",
    "Samples",
    "TraitJudge",
    "Vignette",
    "Vignettes",
    "Wording",
    "bootstrap_ci",
    "canonical_foundation",
    "compare",
    "fingerprint",
    "foundation_key",
    "load_judge_axes",
    "load_mfv",
    "load_paragraphs",
    "load_vignettes",
    "min_coherence",
    "option_token_ids",
    "stage_table",
    "stratified_subset",
]
