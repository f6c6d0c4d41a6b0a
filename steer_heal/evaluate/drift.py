"""Drift: how far the student moved from the base on text that has nothing to do with the trait.

Both instruments read held-out *neutral* prompts (`data/neutral_prompts.txt`: user messages that
touch no trait and no one's moral choices) and compare the student with the base.

`neutral_kl`: the base's own sampled completions of the neutral prompts, teacher-forced through
the student and through the base. At each completion position t (end of turn included) the two
next-token distributions `s_t` (student) and `b_t` (base) give

    kl_rev = mean_t KL(s_t || b_t)        kl_fwd = mean_t KL(b_t || s_t)

token-weighted over all positions, in nats; both are exactly 0 for a student equal to the base.
The divergences are the heal regularisers' own (`healing.regularizers.kl_rev`, `kl_fwd`).

`register_shift`: the student's own sampled completions of the same prompts against the base's,
each embedded with all-MiniLM-L6-v2 (mean pooled, L2-normalised; `evaluate.judge.Embedder`). A
linear two-sample classifier (logistic regression with an L2 penalty `l2` on the weights, fitted
by Newton's method, deterministic) is trained on k - 1 folds and scored on the held-out fold;
the shift is the mean over the k folds of the held-out ROC AUC (0.5: the two sets cannot be told
apart; 1: always told apart). Folds are seeded and keep the two answers to one prompt together
(grouped by prompt): split apart, the held-out answer's same-topic twin of the other label would
sit in training and turn the classifier against topics (measured on SmolLM2: a resample of the
base read AUC 0.09 with ungrouped folds). Beside it, the base model's
perplexity of each sample set (`base_ppl`), the register in the base's eyes.

Controls, measured once per run by the loop before any round (`DriftControls`): the base prompted
with a system prompt of a known other register must reach AUC >= `POSITIVE_AUC` (0.8) against
the base, and the base against itself with another sampling seed must stay <= `NEGATIVE_AUC`
(0.6). An AUC read while either control failed is reported as the instrument failing, never as
"no drift".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..errors import InputError
from ..healing.encoding import completion_nll, context_length, encode_completions
from ..healing.regularizers import kl_fwd, kl_rev
from ..models.logprobs import make_batch, target_logprobs
from ..models.model import input_device, pad_id
from ..runtime import eval_mode
from ..sampling import Sampling
from ..shards import map_batches
from ..steering.generation import Completion, generate
from ..vocab import Number
from .base import EvalResult

POSITIVE_AUC = 0.8  # the known register change must be seen at least this well
NEGATIVE_AUC = 0.6  # the base against itself must stay at most this distinguishable
# A register SmolLM2-135M follows from a system prompt alone. A press-release prompt (the first
# choice) moved its text only to AUC 0.59 (64 prompts, 48 tokens, one H100); of three others tried
# at 32 prompts x 32 tokens on the CPU (a pirate 0.78, French 0.73, a five-year-old 0.84) only this
# one cleared 0.8 (docs/results.md, issue 25)
POSITIVE_SYSTEM = "You are a five-year-old child. Answer in very short, simple baby talk."

Reference = Callable[[], AbstractContextManager]


@torch.no_grad()
def neutral_kl(
    model: nn.Module, tok: Any, completions: Sequence[Completion], reference: Reference, batch_size: int = 8
) -> dict[str, float]:
    """Mean per-token KL between `model` and the model as it runs inside `reference()` (for a
    History, `history.base`), teacher-forced on `completions` (the base's own): both directions."""
    examples, _ = encode_completions(tok, completions, context_length(model, None))
    if not examples:
        raise InputError("no neutral completion tokens to score; the neutral completions are all empty")
    pad, device = pad_id(tok), input_device(model)
    starts = range(0, len(examples), batch_size)

    def one(b: int) -> tuple[float, float, int]:
        batch = make_batch(examples[starts[b] : starts[b] + batch_size], pad, device)
        student = target_logprobs(model, batch).float()
        with reference():
            base = target_logprobs(model, batch).float()
        return (
            float(kl_rev(student, base).double().sum()),
            float(kl_fwd(student, base).double().sum()),
            len(batch.targets),
        )

    rev = fwd = 0.0
    tokens = 0
    with eval_mode(model):
        for batch_rev, batch_fwd, batch_tokens in map_batches(one, len(starts)):  # summed in batch order
            rev, fwd, tokens = rev + batch_rev, fwd + batch_fwd, tokens + batch_tokens
    return {"kl_rev": rev / tokens, "kl_fwd": fwd / tokens, "tokens": float(tokens)}


def auc(scores: Sequence[Number], labels: Sequence[int]) -> float:
    """ROC AUC as the Mann-Whitney statistic: the chance a random positive outscores a random
    negative, ties counting one half."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        raise InputError("AUC needs both classes among the scored rows")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def fit_logistic(
    x: Float[np.ndarray, "n dim"], y: Float[np.ndarray, " n"], l2: float = 1.0, iters: int = 50
) -> Float[np.ndarray, " dim1"]:
    """Weights (bias last) of L2-penalised logistic regression, by Newton's method in float64.
    The penalty `l2 / 2 * |w|^2` leaves the bias free; it keeps the fit finite on separable data."""
    xb = np.hstack([x, np.ones((x.shape[0], 1))])
    w = np.zeros(xb.shape[1])
    penalty = np.full(xb.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(xb @ w)))
        grad = xb.T @ (p - y) + penalty * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(penalty) + 1e-9 * np.eye(xb.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def cv_auc(
    a: Float[np.ndarray, "n dim"],
    b: Float[np.ndarray, "m dim"],
    folds: int = 5,
    seed: int = 0,
    l2: float = 1.0,
    paired: bool = False,
) -> tuple[float, list[float]]:
    """Mean held-out AUC of a linear classifier telling rows of `a` (label 1) from rows of `b`
    (label 0), over `folds` stratified, seeded folds; and the per-fold AUCs.

    `paired`: row i of `a` and row i of `b` answer the same prompt. Then both go to the same fold:
    otherwise the held-out answer's twin, of the other label and on the same topic, sits in the
    training folds, and the classifier learns to call each topic the other class (on SmolLM2's
    neutral samples that drove a resample's AUC to 0.09, not 0.5)."""
    if min(len(a), len(b)) < folds:
        raise InputError(f"cross-validated AUC needs at least {folds} rows per set, got {len(a)} and {len(b)}")
    if paired and len(a) != len(b):
        raise InputError(f"paired sets need one row per prompt in each, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    if paired:
        shared = rng.permutation(np.arange(len(a)) % folds)
        fold_of = [shared, shared]
    else:
        fold_of = [rng.permutation(np.arange(len(rows)) % folds) for rows in (a, b)]
    x = np.vstack([a, b]).astype(np.float64)
    y = np.concatenate([np.ones(len(a)), np.zeros(len(b))])
    assignment = np.concatenate(fold_of)
    per_fold = []
    for k in range(folds):
        train, test = assignment != k, assignment == k
        w = fit_logistic(x[train], y[train], l2=l2)
        scores = np.hstack([x[test], np.ones((int(test.sum()), 1))]) @ w
        per_fold.append(auc(scores.tolist(), y[test].astype(int).tolist()))
    return float(np.mean(per_fold)), per_fold


def register_shift(
    embed: Callable[[Sequence[str]], Tensor],
    student_texts: Sequence[str],
    base_texts: Sequence[str],
    folds: int = 5,
    seed: int = 0,
    paired: bool = True,
) -> dict[str, float]:
    """How well a linear classifier on sentence embeddings tells the student's texts from the base's
    (`paired`: text i of each set answers the same prompt, and the folds keep such pairs together)."""
    a = embed(list(student_texts)).double().cpu().numpy()
    b = embed(list(base_texts)).double().cpu().numpy()
    mean, per_fold = cv_auc(a, b, folds=folds, seed=seed, paired=paired)
    return {"auc": mean, "auc_fold_min": min(per_fold), "auc_fold_max": max(per_fold)}


@dataclass(frozen=True)
class DriftControls:
    """The two controls of `register_shift` on the base, and whether the instrument passed them."""

    positive_auc: float  # the base under POSITIVE_SYSTEM against the base
    negative_auc: float  # the base against itself with another sampling seed
    positive_texts: list[str] = field(default_factory=list)  # the samples each AUC read, kept so the
    negative_texts: list[str] = field(default_factory=list)  # controls can be re-read from a run's events

    @property
    def passed(self) -> bool:
        return self.positive_auc >= POSITIVE_AUC and self.negative_auc <= NEGATIVE_AUC

    def verdict(self) -> str:
        pos = "passed" if self.positive_auc >= POSITIVE_AUC else "FAILED"
        neg = "passed" if self.negative_auc <= NEGATIVE_AUC else "FAILED"
        return (
            f"register-shift controls: a known register change AUC {self.positive_auc:.2f} (>= {POSITIVE_AUC}: {pos}), "
            f"the base against itself AUC {self.negative_auc:.2f} (<= {NEGATIVE_AUC}: {neg})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "positive_auc": self.positive_auc,
            "negative_auc": self.negative_auc,
            "passed": self.passed,
            "positive_texts": list(self.positive_texts),
            "negative_texts": list(self.negative_texts),
        }


@dataclass
class NeutralDrift:
    """Both instruments on one student (an evaluator that also needs the base: `reference()`,
    for a `History` its `base`). `base_completions` are the base's own samples of `prompts`
    (seeded); the student's are drawn with `seed`, the negative control's seed, so a student
    equal to the base reads exactly the negative control."""

    prompts: list[str]
    base_completions: list[Completion]
    reference: Reference
    embed: Callable[[Sequence[str]], Tensor]
    sampling: Sampling
    seed: int
    batch_size: int = 16
    name: str = "drift"
    _base_ppl: float | None = field(default=None, init=False, repr=False)  # the base's own text: once

    def samples(
        self, model: nn.Module, tok: Any, system: str | None = None, seed: int | None = None
    ) -> list[Completion]:
        """Unsteered samples of the neutral prompts from `model` as it runs now."""
        with eval_mode(model):
            return generate(
                model,
                tok,
                self.prompts,
                sampling=self.sampling,
                seed=self.seed if seed is None else seed,
                system=system,
                progress=False,
            )

    def controls(self, model: nn.Module, tok: Any) -> DriftControls:
        """The register shift on the base twice: prompted into another register, and resampled."""
        with self.reference():
            prompted = self.samples(model, tok, system=POSITIVE_SYSTEM)
            again = self.samples(model, tok)
        base_texts = [c.text for c in self.base_completions]
        positive = register_shift(self.embed, [c.text for c in prompted], base_texts, seed=self.seed)
        negative = register_shift(self.embed, [c.text for c in again], base_texts, seed=self.seed)
        return DriftControls(positive["auc"], negative["auc"], [c.text for c in prompted], [c.text for c in again])

    def __call__(self, model: nn.Module, tok: Any) -> EvalResult:
        kl = neutral_kl(model, tok, self.base_completions, self.reference, self.batch_size)
        student = self.samples(model, tok)
        shift = register_shift(
            self.embed, [c.text for c in student], [c.text for c in self.base_completions], seed=self.seed
        )
        with self.reference():  # the base's perplexity of each sample set
            student_ppl = math.exp(completion_nll(model, tok, student, self.batch_size))
            if self._base_ppl is None:
                self._base_ppl = math.exp(completion_nll(model, tok, self.base_completions, self.batch_size))
        metrics = {**kl, **shift, "student_base_ppl": student_ppl, "base_base_ppl": self._base_ppl}
        rows = [{"prompt": c.prompt, "text": c.text} for c in student]
        meta = {"evaluator": "drift", "n_prompts": str(len(self.prompts)), "seed": str(self.seed)}
        return EvalResult(self.name, metrics, rows, meta)
