"""Plain-text evaluators: held-out perplexity and greedy samples for the report.

`HeldOutPerplexity`: each text is tokenised as raw text (with the tokenizer's own BOS when
it adds one, no chat template), truncated to `max_tokens`; the NLL of every token after the
first given its prefix is summed over all texts, and `perplexity = exp(total NLL / total
predicted tokens)` (token-weighted, so long paragraphs count by their length). The NLLs come
from the one log-prob engine (`steer_heal.models.logprobs`). `nll` is the same per-token mean in
nats. (Not to be confused with the filter `steer_heal.filters.Perplexity`, which scores a
completion's tail.)

`Samples`: greedy completions of a few fixed prompts (deterministic), kept as rows; the
metrics are only their mean length and the share that ended with an end-of-turn token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import data_path
from ..errors import InputError
from ..models.logprobs import Example, nll_per_example
from ..models.model import pad_id
from ..sampling import Sampling
from .base import EvalResult, eval_mode


def load_paragraphs(path: str | Path | None = None) -> list[str]:
    """Paragraphs separated by blank lines ('#' lines are comments); bundled neutral set by default."""
    path = Path(path) if path is not None else data_path("neutral.txt")
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    paragraphs = [" ".join(block.split()) for block in "\n".join(lines).split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise InputError(f"{path} holds no paragraphs; separate paragraphs with a blank line")
    return paragraphs


class HeldOutPerplexity:
    """Perplexity of held-out text (the bundled neutral paragraphs by default)."""

    def __init__(self, texts: Sequence[str] | None = None, max_tokens: int = 256, batch_size: int = 4):
        self.texts = list(load_paragraphs() if texts is None else texts)
        if not self.texts or any(not t.strip() for t in self.texts):
            raise InputError("HeldOutPerplexity needs non-empty texts")
        if max_tokens < 2 or batch_size < 1:
            raise InputError(f"max_tokens must be >= 2 and batch_size >= 1, got {max_tokens} and {batch_size}")
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.name = "perplexity"

    @torch.inference_mode()
    def __call__(self, model: nn.Module, tok: Any) -> EvalResult:
        encoded = [tok(text)["input_ids"][: self.max_tokens] for text in self.texts]
        short = [i for i, ids in enumerate(encoded) if len(ids) < 2]
        if short:
            raise InputError(f"text {short[0]} is shorter than 2 tokens; perplexity needs something to predict")
        with eval_mode(model):
            scored = nll_per_example(model, [Example(tuple(ids), 1) for ids in encoded], pad_id(tok), self.batch_size)
        sums, counts = [t for t, _ in scored], [c for _, c in scored]
        mean = sum(sums) / sum(counts)
        rows_out = [{"text": t[:80], "nll": s / c, "tokens": c} for t, s, c in zip(self.texts, sums, counts)]
        metrics = {
            "perplexity": math.exp(mean),
            "nll": mean,
            "n_tokens": float(sum(counts)),
            "n_texts": float(len(encoded)),
        }
        return EvalResult(name=self.name, metrics=metrics, rows=rows_out, meta={"evaluator": "perplexity"})


class Samples:
    """Greedy completions of fixed prompts, for reading next to the numbers (`cuda_graphs`: as
    `Sampling.cuda_graphs`)."""

    def __init__(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        system: str | None = None,
        batch_size: int = 8,
        cuda_graphs: bool = False,
    ):
        if not prompts:
            raise InputError("Samples needs at least one prompt")
        self.prompts, self.max_new_tokens, self.system = list(prompts), max_new_tokens, system
        self.batch_size, self.cuda_graphs = batch_size, cuda_graphs
        self.name = "samples"

    def __call__(self, model: nn.Module, tok: Any) -> EvalResult:
        from ..steering.generation import generate

        sampling = Sampling(  # greedy
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, cuda_graphs=self.cuda_graphs
        )
        with eval_mode(model):
            completions = generate(model, tok, self.prompts, sampling=sampling, system=self.system, progress=False)
        rows = [{"prompt": c.prompt, "text": c.text, "finish_reason": c.finish_reason} for c in completions]
        metrics = {
            "mean_tokens": sum(len(c.token_ids) for c in completions) / len(completions),
            "frac_stopped": sum(c.finish_reason == "stop" for c in completions) / len(completions),
        }
        return EvalResult(name=self.name, metrics=metrics, rows=rows, meta={"evaluator": "samples"})
