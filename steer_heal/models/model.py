"""Model access: layer specs, chat formatting, end-of-turn tokens, padding, devices.

Where each architecture keeps its decoder blocks and its residual writer is
`steer_heal.models.architecture` (re-exported here); loading is `steer_heal.models.loading`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor, nn

from ..errors import InputError
from .architecture import (
    FAMILIES,
    Architecture,
    Family,
    architecture,
    decoder_blocks,
    family_of,
    hidden_size,
    n_layers,
    residual_writer,
    text_config,
    unwrap,
)

__all__ = [
    "FAMILIES",
    "Architecture",
    "Depth",
    "Family",
    "LayerSpec",
    "architecture",
    "decoder_blocks",
    "family_of",
    "hidden_size",
    "n_layers",
    "residual_writer",
    "resolve_layers",
    "unwrap",
]


@dataclass(frozen=True)
class Depth:
    """A band of decoder blocks given as fractions of depth, `0 <= lo <= hi <= 1`.

    `Depth(0.45, 0.55)` of 30 blocks is blocks 13..16; `Depth(0.0, 1.0)` is every block.
    Write it this way rather than as a bare pair: `(0, 1)` means blocks 0 and 1.
    """

    lo: float
    hi: float

    def __post_init__(self) -> None:
        lo, hi = float(self.lo), float(self.hi)
        if not (0.0 <= lo <= hi <= 1.0):
            raise InputError(f"depth fractions must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    def blocks(self, n: int) -> tuple[int, ...]:
        """`range(floor(lo * n), max(floor(lo * n) + 1, ceil(hi * n)))`, clipped to n blocks."""
        start = min(math.floor(self.lo * n), n - 1)
        stop = min(max(start + 1, math.ceil(self.hi * n)), n)
        return tuple(range(start, stop))


# a Depth band; an int or a list of ints (block indices, negative from the end); or a pair
# of floats, read as Depth (TOML and the command line cannot carry the type)
LayerSpec = int | Depth | Sequence[int | float]


def resolve_layers(spec: LayerSpec, n: int) -> tuple[int, ...]:
    """Turn a layer spec into sorted, unique, non-negative block indices.

    - `Depth(lo, hi)`, or a pair of floats `(lo, hi)`: the depth band (see `Depth.blocks`);
    - an int (negative counts from the end): one layer;
    - a sequence of ints: those layers.
    """
    if isinstance(spec, Depth):
        return spec.blocks(n)
    if isinstance(spec, bool):
        raise InputError(f"layer spec must be an int, a list of ints or Depth(lo, hi), not {spec!r}")
    if isinstance(spec, int):
        spec = [spec]
    spec = list(spec)
    if not spec:
        raise InputError("layer spec is empty; pass e.g. Depth(0.45, 0.55) or [13, 14]")
    if len(spec) == 2 and all(isinstance(x, float) for x in spec):
        return Depth(*spec).blocks(n)
    out = set()
    for x in spec:
        if isinstance(x, bool) or not isinstance(x, int):
            raise InputError(f"layer {x!r} is not an int; mix of ints and fractions is not a layer spec")
        if not -n <= x < n:
            raise InputError(f"layer {x} out of range for a model with {n} layers (valid: {-n}..{n - 1})")
        out.add(x % n)
    return tuple(sorted(out))


# ---------------------------------------------------------------- chat formatting


BASE_PROMPT = "User: {user}\nAssistant:\n"  # a base model's dialogue prefix (no chat template)


def chat_prompt(tok, user: str, system: str | None = None) -> str:
    """The chat-templated prompt text, ending with the generation prompt (assistant tag).

    Templates without a system role (Gemma2 raises, others drop it silently) get the system
    text folded into the first user turn. A tokenizer without a chat template (a base model:
    gpt2, opt, bloom, falcon, gpt_neox) gets plain text instead: the tokenizer's BOS where it
    adds one, the system text and a blank line if given, then `BASE_PROMPT` ("User: ...",
    newline, "Assistant:", newline), so a persona pair is a prefix and answers start a line.
    """
    if getattr(tok, "chat_template", None) is None:
        bos = tok.bos_token if tok.bos_token and _adds_bos(tok) else ""
        return bos + (f"{system}\n\n" if system else "") + BASE_PROMPT.format(user=user)
    if system:
        try:
            text = tok.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": user}],
                tokenize=False,
                add_generation_prompt=True,
            )
            if system in text:
                return text
        except Exception:  # jinja2 TemplateError from templates that reject the system role
            pass
        user = f"{system}\n\n{user}"
    return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


def _adds_bos(tok) -> bool:
    """Whether the tokenizer puts its BOS in front of text by itself (then a base prompt writes it)."""
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id


def encode(tok, text: str) -> list[int]:
    """Token ids of already-formatted text: chat templates write their own special tokens."""
    return tok(text, add_special_tokens=False)["input_ids"]


def pad_id(tok) -> int:
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pid is None:
        raise InputError("tokenizer has neither a pad nor an eos token; set tok.pad_token")
    return int(pid)


_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
_SENTINEL = "SteerHealEndOfTurnProbe"


def template_end_of_turn(tok) -> int | None:
    """The token the chat template writes right after an assistant message, when it is a
    special (added) token: read from the template itself, not from a string table."""
    if getattr(tok, "chat_template", None) is None:
        return None
    try:
        text = tok.apply_chat_template(
            [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
    except Exception:  # templates that reject this turn order or need extra variables
        return None
    if not isinstance(text, str) or _SENTINEL not in text:
        return None
    tail = text.split(_SENTINEL, 1)[1].lstrip(" ")
    ids = encode(tok, tail) if tail else []
    if not ids:
        return None
    special = set(getattr(tok, "all_special_ids", []) or []) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    return int(ids[0]) if ids[0] in special else None


def stop_token_ids(model: nn.Module, tok) -> list[int]:
    """Every token that ends an assistant turn: eos ids from the generation config and the
    tokenizer, the template's end-of-turn token, and known end-of-turn markers in the vocabulary."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(unwrap(model), "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    ids.add(end_of_turn_id(tok))
    vocab = tok.get_vocab()
    ids.update(vocab[marker] for marker in _END_OF_TURN if marker in vocab)
    return sorted(ids)


def end_of_turn_id(tok) -> int:
    """The token the chat template closes an assistant turn with (appended in training):
    read from the template; else the first known marker in the vocabulary; else eos."""
    from_template = template_end_of_turn(tok)
    if from_template is not None:
        return from_template
    vocab = tok.get_vocab()
    for marker in _END_OF_TURN:
        if marker in vocab:
            return vocab[marker]
    if tok.eos_token_id is None:
        raise InputError("tokenizer has no end-of-turn or eos token")
    return int(tok.eos_token_id)


def left_pad(
    sequences: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu", multiple: int = 1
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """Left-pad token id lists: (input_ids, attention_mask, position_ids).

    Position ids count real tokens only, so a padded row sees the same positions as the
    same row alone (the models do not derive them from the mask in a plain forward). The
    width is rounded up to a `multiple` (compiled decoding buckets prompt lengths, so a
    few graphs serve every batch).
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise InputError("cannot pad an empty batch or an empty sequence")
    if multiple < 1:
        raise InputError(f"multiple must be >= 1, got {multiple}")
    width = -(-max(len(s) for s in sequences) // multiple) * multiple
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def execution_device(module: nn.Module) -> torch.device:
    """Where a module computes. Under an accelerate device map that is the dispatch hook's
    execution device (an offloaded module's weights sit on "meta" until its forward);
    otherwise the device of its first parameter that is not on "meta"."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    raise InputError(
        f"cannot tell where {type(module).__name__} runs: its weights are all on 'meta' and no "
        "accelerate hook names an execution device; load the model with device_map or materialise it"
    )


def block_param(block: nn.Module) -> Tensor:
    for p in block.parameters():
        return p
    raise InputError("decoder block has no parameters")


def placement(block: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a block computes and in which dtype (offloaded weights sit on "meta" until used)."""
    return execution_device(block), block_param(block).dtype


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's device (differs from parameters()[0] when sharded)."""
    return execution_device(unwrap(model).get_input_embeddings())


def model_id(model: nn.Module) -> str:
    return str(getattr(unwrap(model).config, "_name_or_path", "") or "unknown")


def context_window(model: nn.Module) -> int | None:
    """The most positions the model takes (prompt plus generated tokens), from its config; None
    when the config does not say (e.g. models with unbounded relative positions)."""
    config = text_config(unwrap(model).config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
