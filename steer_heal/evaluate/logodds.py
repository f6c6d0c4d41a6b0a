"""`AnswerLogOdds`: the trait as the model's preference between two answers, with stance
and wording measured apart.

For a held-out scenario x (a user message, chat-formatted with an optional system prompt)
and an answer a, `lp(a) = sum_t log p(a_t | x, a_<t)` over a's tokens, scored as the
assistant's reply. An axis supplies crossed answer pairs: each stance written in both
vocabularies,

    P  = pos stance, pos words        N  = neg stance, neg words
    P' = pos stance, neg words        N' = neg stance, pos words

so that, per pair k,

    orig_k = lp(P) - lp(N)            (what a naive probe reports)
    swap_k = lp(P') - lp(N')
    S_k = (orig_k + swap_k) / 2       stance: pos over neg, each vocabulary used once per side
    W_k = (orig_k - swap_k) / 2       wording: pos words over neg words, each stance once per side

and per scenario S = mean_k S_k, W = mean_k W_k. Off-axis pairs (a, b) give a control
`off = mean_j lp(a_j) - lp(b_j)` that an axis-specific change should leave alone. The same
quantities from per-token mean log-probs (`*_per_token`) guard against length effects.

An evaluation is `EvalResult` metrics (means over scenarios) plus one row per scenario;
`shift` compares two results paired by scenario (mean difference, its standard error and a
bootstrap 95% interval) and `retain` is a healed shift over a steered shift, with its
paired bootstrap interval. Scoring is one batched forward per (answer, system) over all
scenarios, with only the answer positions reaching the output head (`steer_heal.models.logprobs`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import CROSSED_KEYS, MIN_PAIRS
from ..errors import InputError
from ..models.logprobs import Example, nll_per_example
from ..models.model import chat_prompt, encode, input_device, pad_id
from ..runtime import eval_mode
from ..shards import map_batches
from .base import EvalResult
from .forced import _forward, _sliding_window

COMPONENTS = ("stance", "wording", "off_axis")


@dataclass(frozen=True)
class AnswerPair:
    """One stance pair in crossed wording (see the module docstring)."""

    pos: str  # pos stance, pos vocabulary
    neg: str  # neg stance, neg vocabulary
    pos_in_neg_words: str
    neg_in_pos_words: str

    def answers(self) -> tuple[str, str, str, str]:
        return (self.pos, self.neg, self.pos_in_neg_words, self.neg_in_pos_words)


@dataclass(frozen=True)
class OffAxisPair:
    a: str
    b: str


@dataclass
class AnswerLogOdds:
    """Stance, wording and off-axis log-odds on held-out scenarios (an `Evaluator`)."""

    scenarios: Sequence[str]
    pairs: Sequence[AnswerPair]
    off_axis: Sequence[OffAxisPair] = ()
    system: str | None = None
    batch_size: int = 16
    # None: share each scenario's prompt cache on a CPU (4x fewer tokens, compute-bound) and score
    # whole sequences in batches elsewhere (a GPU is host-bound: 2 forwards per scenario cost more)
    shared_prefix: bool | None = None
    name: str = "logodds"
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scenarios = list(self.scenarios)
        self.pairs = list(self.pairs)
        self.off_axis = list(self.off_axis)
        if len(self.scenarios) < 2:
            raise InputError(f"AnswerLogOdds needs at least 2 held-out scenarios, got {len(self.scenarios)}")
        if len(self.pairs) < MIN_PAIRS:
            raise InputError(f"AnswerLogOdds needs at least {MIN_PAIRS} crossed answer pairs, got {len(self.pairs)}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def from_axis(cls, axis: Any, **kwargs: Any) -> AnswerLogOdds:
        """The probe an axis file defines (`eval_prompts`, `[[answers]]`, `[[off_axis]]`)."""
        if not axis.answers or not axis.eval_prompts:
            raise InputError(
                f"axis {axis.name!r} has no eval_prompts or [[answers]]: the log-odds probe needs held-out scenarios "
                f"and >= {MIN_PAIRS} crossed answer pairs in the axis file"
            )
        pairs = [AnswerPair(**{k: p[k] for k in CROSSED_KEYS}) for p in axis.answers]
        off = [OffAxisPair(p["a"], p["b"]) for p in axis.off_axis]
        return cls(axis.eval_prompts, pairs, off, **kwargs)

    def protocol(self) -> str:
        """A hash of the answers (not the scenarios or the persona): what makes two runs comparable."""
        spec = [[p.answers() for p in self.pairs], [(o.a, o.b) for o in self.off_axis]]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.scenarios).encode()).hexdigest()[:16]

    def answer_texts(self) -> list[str]:
        """Every distinct answer, in a fixed order."""
        texts = [a for p in self.pairs for a in p.answers()] + [x for o in self.off_axis for x in (o.a, o.b)]
        return list(dict.fromkeys(texts))

    def score(self, model: nn.Module, tok: Any, shared_prefix: bool | None = None) -> dict[str, np.ndarray]:
        """{answer: [n_scenarios, 2] (summed log-prob, tokens)} under the model as it runs now.

        With `shared_prefix` each scenario's prompt runs once and its KV cache serves all the
        answers (about 4x fewer tokens, two forwards per scenario); without it every
        (scenario, answer) sequence is scored whole, `batch_size` sequences a forward. Both
        give the same numbers up to float rounding (tested). The default (None, or the
        probe's `shared_prefix` field) shares on a CPU, where tokens cost, and not on an
        accelerator, where forwards cost; never for models with a sliding attention window.
        """
        prompts = [encode(tok, chat_prompt(tok, x, system=self.system)) for x in self.scenarios]
        answers = {a: encode(tok, a) for a in self.answer_texts()}
        empty = [a for a, ids in answers.items() if not ids]
        if empty:
            raise InputError(f"answer {empty[0]!r} tokenises to 0 tokens; write a longer answer in the axis file")
        if shared_prefix is None:
            shared_prefix = self.shared_prefix
        if shared_prefix is None:
            shared_prefix = input_device(model).type == "cpu"
        shared_prefix = shared_prefix and _sliding_window(model) is None
        n = len(prompts)
        out = {a: np.zeros((n, 2), dtype=np.float64) for a in answers}
        with eval_mode(model):
            if shared_prefix:  # a scenario's prompt and its answers are one batch
                scored_by_prompt = map_batches(
                    lambda i: _shared_prompt_scores(model, prompts[i], list(answers.values()), pad_id(tok)), n
                )
                for i, values in enumerate(scored_by_prompt):
                    for a, value in zip(answers, values):
                        out[a][i] = value
                return out
            examples = [Example(tuple(p + ids), len(p)) for ids in answers.values() for p in prompts]
            scored = nll_per_example(model, examples, pad_id(tok), self.batch_size)
        for i, a in enumerate(answers):
            out[a][:] = [(-total, count) for total, count in scored[i * n : (i + 1) * n]]
        return out

    def __call__(self, model: nn.Module, tok: Any) -> EvalResult:
        table = self.score(model, tok)
        rows = per_scenario(self.scenarios, self.pairs, self.off_axis, table)
        metrics = {key: float(np.mean([r[key] for r in rows])) for key in rows[0] if key != "scenario"}
        metrics["n_scenarios"] = float(len(rows))
        meta = {
            "evaluator": "answer_logodds",
            "items": self.fingerprint(),
            "protocol": self.protocol(),
            "system": hashlib.sha256((self.system or "").encode()).hexdigest()[:8],
            **self.meta,
        }
        return EvalResult(name=self.name, metrics=metrics, rows=rows, meta=meta)


@torch.inference_mode()
def _shared_prompt_scores(
    model: nn.Module, prompt: list[int], answers: list[list[int]], pad: int
) -> list[tuple[float, int]]:
    """(summed log-prob, tokens) of each answer after one prompt, the prompt run once.

    The prompt's KV cache is repeated over the answers; the answers follow it left-padded
    (pad slots masked out, positions counting real tokens only), so each row computes what
    `prompt + answer` alone would. The prompt's last logits predict every answer's first token.
    """
    device = input_device(model)
    head = torch.tensor([prompt], device=device)
    logits, cache = _forward(
        model, head, torch.ones_like(head), torch.arange(len(prompt), device=device)[None], None, 1
    )
    first = logits[0, -1].log_softmax(-1)
    cache.batch_repeat_interleave(len(answers))
    width = max(len(a) for a in answers)
    ids = torch.full((len(answers), width), pad, dtype=torch.long)
    tail = torch.zeros((len(answers), width), dtype=torch.long)
    for row, a in enumerate(answers):
        ids[row, width - len(a) :] = torch.tensor(a)
        tail[row, width - len(a) :] = 1
    ids, tail = ids.to(device), tail.to(device)
    mask = torch.cat([torch.ones((len(answers), len(prompt)), dtype=torch.long, device=device), tail], dim=1)
    positions = (len(prompt) + tail.cumsum(1) - 1).clamp(min=len(prompt))
    logits, _ = _forward(model, ids, mask, positions, cache, width)
    logp = logits.log_softmax(-1)  # [answers, width, vocab]: column j predicts column j + 1
    picked = logp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    # every answer token but the first: a real token predicted from a real one (a pad slot
    # before the first token predicts nothing; the prompt's last logits predict that one)
    real = (tail[:, 1:] * tail[:, :-1]).bool()
    later = torch.where(real, picked, 0.0).sum(1)
    first_ids = torch.tensor([a[0] for a in answers], device=first.device)
    totals = (first[first_ids] + later.to(first.device)).tolist()
    return [(total, len(a)) for total, a in zip(totals, answers)]


def per_scenario(
    scenarios: Sequence[str],
    pairs: Sequence[AnswerPair],
    off_axis: Sequence[OffAxisPair],
    table: Mapping[str, np.ndarray],
) -> list[dict[str, Any]]:
    """The module docstring's S, W, orig, swap and off per scenario, summed and per token."""
    rows = []
    for i, x in enumerate(scenarios):
        row: dict[str, Any] = {"scenario": x}
        for suffix, value in (
            ("", lambda a, i=i: table[a][i, 0]),
            ("_per_token", lambda a, i=i: table[a][i, 0] / table[a][i, 1]),
        ):
            orig = [value(p.pos) - value(p.neg) for p in pairs]
            swap = [value(p.pos_in_neg_words) - value(p.neg_in_pos_words) for p in pairs]
            row[f"orig{suffix}"] = float(np.mean(orig))
            row[f"swap{suffix}"] = float(np.mean(swap))
            row[f"stance{suffix}"] = float(np.mean([(o + s) / 2 for o, s in zip(orig, swap)]))
            row[f"wording{suffix}"] = float(np.mean([(o - s) / 2 for o, s in zip(orig, swap)]))
            off = [value(o.a) - value(o.b) for o in off_axis]
            row[f"off_axis{suffix}"] = float(np.mean(off)) if off else 0.0
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Shift:
    """A paired difference of one component between two stages, over scenarios."""

    component: str
    mean: float
    se: float
    ci: tuple[float, float]
    n: int

    @property
    def z(self) -> float:
        """mean / se (inf when every scenario moved by the same amount)."""
        return math.inf if self.se == 0 else self.mean / self.se

    @property
    def noise(self) -> bool:
        """The 95% interval holds 0: the shift is not told apart from noise."""
        return self.ci[0] <= 0 <= self.ci[1]

    def to_dict(self) -> dict[str, Any]:
        return {"component": self.component, "mean": self.mean, "se": self.se, "ci": list(self.ci), "n": self.n}


def _paired(reference: EvalResult, other: EvalResult, component: str) -> np.ndarray:
    if reference.meta.get("protocol") != other.meta.get("protocol"):
        raise InputError("log-odds results used different answer pairs (protocol hash); compare like with like")
    ref = {r["scenario"]: r[component] for r in reference.rows}
    new = {r["scenario"]: r[component] for r in other.rows}
    if not ref or set(ref) != set(new):
        raise InputError("log-odds results are not paired: evaluate both stages on the same scenarios (with rows)")
    keys = sorted(ref)
    return np.array([new[k] - ref[k] for k in keys], dtype=np.float64)


def _bootstrap(values: np.ndarray, stat, n_boot: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(n_boot, len(values)))
    stats = np.array([stat(values[p]) for p in picks])
    stats = stats[np.isfinite(stats)]
    if len(stats) == 0:
        return (math.nan, math.nan)
    return (float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975)))


def shift(
    reference: EvalResult, other: EvalResult, component: str = "stance", n_boot: int = 2000, seed: int = 0
) -> Shift:
    """How far `other` moved `component` from `reference`, paired over scenarios."""
    diff = _paired(reference, other, component)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
    return Shift(component, float(diff.mean()), se, _bootstrap(diff, np.mean, n_boot, seed), len(diff))


def retain(
    base: EvalResult,
    steered: EvalResult,
    healed: EvalResult,
    component: str = "stance",
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """Healed shift / steered shift for `component`, with a paired bootstrap 95% interval
    (scenarios resampled together for both shifts)."""
    d_steer = _paired(base, steered, component)
    d_heal = _paired(base, healed, component)
    if len(d_steer) != len(d_heal):
        raise InputError("retain needs the three stages on the same scenarios")
    both = np.stack([d_heal, d_steer], axis=1)

    def ratio(sample: np.ndarray) -> float:
        denominator = sample[:, 1].mean()
        return sample[:, 0].mean() / denominator if denominator != 0 else math.nan

    return ratio(both), _bootstrap(both, ratio, n_boot, seed)


def shift_table(stages: Mapping[str, EvalResult], base: str = "base", steered: str | None = None) -> str:
    """Markdown: per stage the stance, wording and off-axis shifts against `base` (mean [95% CI]),
    the stance retained against the `steered` stage, and the naive (orig) shift."""
    if base not in stages:
        raise InputError(f"shift table needs the base stage {base!r}; stages: {', '.join(stages)}")
    ref = stages[base]
    lines = [
        "| stage | d stance | d wording | d off-axis | stance z | retain (stance) | d naive orig |",
        "|---|---|---|---|---:|---|---:|",
    ]
    for name, result in stages.items():
        if name == base:
            m = result.metrics
            lines.append(
                f"| {name} | S {m['stance']:+.3f} | W {m['wording']:+.3f} | off {m['off_axis']:+.3f} | | | "
                f"{m['orig']:+.3f} |"
            )
            continue
        cells = []
        for component in COMPONENTS:
            s = shift(ref, result, component)
            cells.append(f"{s.mean:+.3f} [{s.ci[0]:+.3f}, {s.ci[1]:+.3f}]{' noise' if s.noise else ''}")
        stance = shift(ref, result, "stance")
        kept = ""
        if steered and steered in stages and name != steered and not name.startswith(("base", "prompted")):
            value, (lo, hi) = retain(ref, stages[steered], result, "stance")
            kept = f"{value:.2f} [{lo:.2f}, {hi:.2f}]"
        orig = shift(ref, result, "orig").mean
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {stance.z:+.1f} | {kept} | {orig:+.3f} |")
    return "\n".join(lines)
