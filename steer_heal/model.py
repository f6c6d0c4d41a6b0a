"""Model access: decoder-block discovery, layer specs, chat formatting, padding, devices.

Loading (any HF id or path, the embedded SmolLM2, tiny models) is `steer_heal.loading`.

Everything else in the library reaches into a model only through this module, so one
table (`FAMILIES`) says where each supported architecture keeps its decoder blocks and
the linear layer that writes the MLP output into the residual stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor, nn


@dataclass(frozen=True)
class Family:
    """Where an architecture keeps its blocks, relative to the causal-LM wrapper."""

    block_paths: tuple[str, ...]
    mlp_out: str | None  # attribute path inside a block; None: no exact bias fold exists
    why_no_bake: str = ""


_GEMMA_NO_BAKE = (
    "the MLP output passes post_feedforward_layernorm before the residual add, so a bias "
    "cannot reproduce h + coeff*v exactly; use vec.apply(model, coeff) (hooks) instead"
)

FAMILIES: dict[str, Family] = {
    "llama": Family(("model.layers",), "mlp.down_proj"),
    "mistral": Family(("model.layers",), "mlp.down_proj"),
    "qwen2": Family(("model.layers",), "mlp.down_proj"),
    "qwen3": Family(("model.layers",), "mlp.down_proj"),
    "phi3": Family(("model.layers",), "mlp.down_proj"),
    "gemma2": Family(("model.layers",), None, _GEMMA_NO_BAKE),
    "gemma3_text": Family(("model.layers",), None, _GEMMA_NO_BAKE),
    "gemma3": Family(("model.language_model.layers", "language_model.model.layers"), None, _GEMMA_NO_BAKE),
    "gpt2": Family(("transformer.h",), "mlp.c_proj"),
    "gpt_neox": Family(("gpt_neox.layers",), "mlp.dense_4h_to_h"),
}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def family_of(model: nn.Module) -> tuple[str, Family]:
    model_type = getattr(getattr(unwrap(model), "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model family {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return model_type, FAMILIES[model_type]


def _get_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in depth order; a block's output is the residual stream."""
    name, family = family_of(model)
    base = unwrap(model)
    for path in family.block_paths:
        blocks = _get_path(base, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise ValueError(f"could not find the decoder blocks of this {name} model at {family.block_paths}")


def n_layers(model: nn.Module) -> int:
    return len(decoder_blocks(model))


def hidden_size(model: nn.Module) -> int:
    config = unwrap(model).config
    config = getattr(config, "text_config", None) or config
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        raise ValueError("model config has no hidden_size / n_embd")
    return int(size)


def residual_writer(model: nn.Module, layer: int) -> nn.Module:
    """The linear layer whose output is added into the residual stream by block `layer`.

    Raises when no exact bias fold exists for the family (Gemma2/3's post-FFN norm).
    Under peft, returns the wrapped base layer, so a bias lands in the frozen weights.
    """
    name, family = family_of(model)
    if family.mlp_out is None:
        raise ValueError(f"cannot bake a vector into a {name} model: {family.why_no_bake}")
    module = _get_path(decoder_blocks(model)[layer], family.mlp_out)
    if module is None:
        raise ValueError(f"{name} block {layer} has no {family.mlp_out}")
    base_layer = getattr(module, "base_layer", None)
    return base_layer if isinstance(base_layer, nn.Module) else module


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
            raise ValueError(f"depth fractions must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")
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
        raise ValueError(f"layer spec must be an int, a list of ints or Depth(lo, hi), not {spec!r}")
    if isinstance(spec, int):
        spec = [spec]
    spec = list(spec)
    if not spec:
        raise ValueError("layer spec is empty; pass e.g. Depth(0.45, 0.55) or [13, 14]")
    if len(spec) == 2 and all(isinstance(x, float) for x in spec):
        return Depth(*spec).blocks(n)
    out = set()
    for x in spec:
        if isinstance(x, bool) or not isinstance(x, int):
            raise ValueError(f"layer {x!r} is not an int; mix of ints and fractions is not a layer spec")
        if not -n <= x < n:
            raise ValueError(f"layer {x} out of range for a model with {n} layers (valid: {-n}..{n - 1})")
        out.add(x % n)
    return tuple(sorted(out))


# ---------------------------------------------------------------- chat formatting


def chat_prompt(tok, user: str, system: str | None = None) -> str:
    """The chat-templated prompt text, ending with the generation prompt (assistant tag).

    Templates without a system role (Gemma2 raises, others drop it silently) get the system
    text folded into the first user turn.
    """
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(
            "tokenizer has no chat template; use an instruction-tuned model's tokenizer or set tok.chat_template"
        )
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


def encode(tok, text: str) -> list[int]:
    """Token ids of already-formatted text: chat templates write their own special tokens."""
    return tok(text, add_special_tokens=False)["input_ids"]


def pad_id(tok) -> int:
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pid is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; set tok.pad_token")
    return int(pid)


_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


def stop_token_ids(model: nn.Module, tok) -> list[int]:
    """Every token that ends an assistant turn: eos ids from the generation config and the
    tokenizer, plus the template's end-of-turn marker when it is a single token."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(unwrap(model), "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    vocab = tok.get_vocab()
    ids.update(vocab[marker] for marker in _END_OF_TURN if marker in vocab)
    return sorted(ids)


def end_of_turn_id(tok) -> int:
    """The token the chat template closes an assistant turn with (appended in training)."""
    vocab = tok.get_vocab()
    for marker in _END_OF_TURN:
        if marker in vocab:
            return vocab[marker]
    if tok.eos_token_id is None:
        raise ValueError("tokenizer has no end-of-turn or eos token")
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
        raise ValueError("cannot pad an empty batch or an empty sequence")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
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
    raise ValueError(
        f"cannot tell where {type(module).__name__} runs: its weights are all on 'meta' and no "
        "accelerate hook names an execution device; load the model with device_map or materialise it"
    )


def block_param(block: nn.Module) -> Tensor:
    for p in block.parameters():
        return p
    raise ValueError("decoder block has no parameters")


def placement(block: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a block computes and in which dtype (offloaded weights sit on "meta" until used)."""
    return execution_device(block), block_param(block).dtype


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's device (differs from parameters()[0] when sharded)."""
    return execution_device(unwrap(model).get_input_embeddings())


def model_id(model: nn.Module) -> str:
    return str(getattr(unwrap(model).config, "_name_or_path", "") or "unknown")
