"""Contrastive pairs: a steering vector from the user's own examples, as CAA and repeng make them.

A pair is two texts that differ in the trait. Either a chat exchange (`prompt` set: the user
message, then `pos` or `neg` as the assistant's answer, formatted with the chat template,
reading stops before the end-of-turn token) or raw text (`prompt` None: `pos` and `neg` are
whole texts, tokenized with the special tokens the tokenizer adds, BOS included, as a base
model sees text).

Where the activation h_l(t) is read (`read`):

    last   the block output at the text's last token (CAA reads the answer letter there,
           repeng the last token of each text): the default
    mean   the mean over the answer's tokens (chat) or over the whole text (raw)

How the pair differences d_i = h_l(pos_i) - h_l(neg_i) become a direction (`method`):

    mean_diff   v_l = mean_i d_i
    pca         repeng's pca_diff: u = the first principal component of the d_i (centred, as
                sklearn's PCA centres them), its sign fixed so that mean_i d_i . u >= 0 (pos
                above neg); v_l = (mean_i d_i . u) u, the mean difference's length along u,
                so coefficient 1 means the same as for mean_diff. Where the pairs' shifts
                agree and their spread lies elsewhere, u misses the mean and v is short:
                PCA of differences finds the direction the pairs vary along most.

Files (`read_pairs`): a JSONL of {"pos": ..., "neg": ...} (optionally "prompt"); a CAA A/B
JSON list of {"question", "answer_matching_behavior", "answer_not_matching_behavior"} (chat
pairs: the question, then each answer); a repeng-style JSON list of {"positive", "negative"}
(raw texts). A bad file is one line naming the file, the entry and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..errors import FileFormatError, InputError, MissingFile
from ..models.model import Depth, LayerSpec, chat_prompt, encode, n_layers, pad_id, resolve_layers
from ..vocab import PairMethod, PairRead, check_choice
from .extract import token_states


@dataclass(frozen=True)
class ContrastPair:
    """Two texts that differ in the trait; `prompt` makes them answers in a chat exchange."""

    pos: str
    neg: str
    prompt: str | None = None


def _tokens(tok, pair: ContrastPair, text: str) -> tuple[list[int], int]:
    """(token ids, index where the answer starts) of one side of a pair."""
    if pair.prompt is None:  # raw text: the tokenizer's own special tokens (BOS where the model uses one)
        formatted = bool(tok.bos_token) and text.startswith(tok.bos_token)  # e.g. a chat template's output
        return list(tok(text, add_special_tokens=not formatted)["input_ids"]), 0
    head = encode(tok, chat_prompt(tok, pair.prompt))
    return head + encode(tok, text), len(head)


def pair_directions(
    model: nn.Module,
    tok,
    pairs: Sequence[ContrastPair],
    layers: LayerSpec = Depth(0.45, 0.55),
    read: str = "last",
    method: str = "mean_diff",
    batch_size: int = 8,
    progress: bool = False,
) -> dict[int, Float[Tensor, " hidden"]]:
    """The directions of `pairs` per layer (fp32, CPU): see the module docstring."""
    check_choice("read", read, PairRead)
    check_choice("method", method, PairMethod)
    if len(pairs) < (2 if method == "pca" else 1):
        raise InputError(f"{method} needs at least {2 if method == 'pca' else 1} pairs, got {len(pairs)}")
    for i, pair in enumerate(pairs):
        if not (pair.pos.strip() and pair.neg.strip()):
            raise InputError(f"pair {i} has an empty pos or neg text")
    encoded = [_tokens(tok, pair, text) for pair in pairs for text in (pair.pos, pair.neg)]
    if read == "mean" and any(start >= len(ids) for ids, start in encoded):
        raise InputError("a chat pair's answer has no tokens to average; give non-empty answers")
    chosen = resolve_layers(layers, n_layers(model))
    # pos of every pair first, then neg, as `mean_difference` orders its texts
    order = [2 * i for i in range(len(pairs))] + [2 * i + 1 for i in range(len(pairs))]
    token_lists = [encoded[k][0] for k in order]
    spans = [encoded[k][1] for k in order] if read == "mean" else None
    states = token_states(model, token_lists, pad_id(tok), chosen, batch_size, progress, spans)
    n = len(pairs)
    if method == "mean_diff":
        return {layer: (h[:n].double().mean(0) - h[n:].double().mean(0)).float() for layer, h in states.items()}
    return {layer: pca_direction(h[:n] - h[n:]) for layer, h in states.items()}


def pca_direction(diffs: Float[Tensor, "n hidden"]) -> Float[Tensor, " hidden"]:
    """The module docstring's `pca`: first principal component of the centred differences,
    signed toward their mean, scaled to the mean's length along it."""
    d = diffs.double()
    mean = d.mean(0)
    _, _, vh = torch.linalg.svd(d - mean, full_matrices=False)
    u = vh[0]
    along = float(mean @ u)
    if along < 0:
        u, along = -u, -along
    return (along * u).float()


def read_pairs(path: str | os.PathLike) -> list[ContrastPair]:
    """Pairs from a JSONL of {"pos", "neg"[, "prompt"]}, a CAA A/B JSON list or a repeng-style
    JSON list of {"positive", "negative"} (the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"no pairs file at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise FileFormatError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise FileFormatError(f"{path}: expected a JSON list of pairs, got {type(data).__name__}")
        entries = [(f"entry {i}", entry) for i, entry in enumerate(data)]
    if not entries:
        raise FileFormatError(f"{path} holds no pairs")
    return [_pair(path, where, entry) for where, entry in entries]


_FORMATS = (
    (("pos", "neg"), lambda e: ContrastPair(e["pos"], e["neg"], e.get("prompt"))),
    (
        ("question", "answer_matching_behavior", "answer_not_matching_behavior"),
        lambda e: ContrastPair(e["answer_matching_behavior"], e["answer_not_matching_behavior"], e["question"]),
    ),
    (("positive", "negative"), lambda e: ContrastPair(e["positive"], e["negative"])),
)


def _pair(path: Path, where: str, entry: object) -> ContrastPair:
    if not isinstance(entry, dict):
        raise FileFormatError(f"{path}, {where}: expected an object, got {type(entry).__name__}")
    for keys, make in _FORMATS:
        if keys[0] in entry:
            for key in (*keys, "prompt"):
                if key in entry and entry[key] is not None and not (isinstance(entry[key], str) and entry[key].strip()):
                    raise FileFormatError(f"{path}, {where}: field {key!r} must be a non-empty string")
            missing = [k for k in keys if k not in entry]
            if missing:
                raise FileFormatError(f"{path}, {where}: missing field {missing[0]!r}")
            return make(entry)
    raise FileFormatError(
        f"{path}, {where}: no pair fields; expected pos/neg, question/answer_matching_behavior/"
        "answer_not_matching_behavior (CAA) or positive/negative (repeng)"
    )
