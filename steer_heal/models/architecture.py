"""Where a model keeps its decoder blocks, and which linear writes its MLP output into the
residual stream. Three tiers; the first that answers wins:

1. **An override**: `load_model(..., blocks="model.layers", writer="mlp.down_proj")` (the
   CLI's `--blocks` / `--writer`), `set_architecture(model, ...)` on a loaded model, or
   `register_family(model_type, ...)` for every model of one type.
2. **The verified table** `FAMILIES`: each entry is tested on a tiny random model of its
   family (tests/test_families.py): hooks equal a hand-written hook, and bake equals hooks
   wherever the table allows bake.
3. **Structural discovery**: the `nn.ModuleList` whose length is the (text) config's
   `num_hidden_layers` and whose items are of a class the model names in
   `_no_split_modules` (the unit accelerate never splits: a decoder block); the writer is the
   one linear in a block, outside attention, whose output width is the hidden size.

Bake adds `coeff * v` to the writer's bias. That equals adding `coeff * v` to the block
output only when nothing sits between the writer and the residual add: a norm after the
MLP (Gemma2/3, OLMo2, GLM4: post-norm), a scale (Granite's `residual_multiplier`) or a
router (MoE) breaks it. Where exactness is not in the table (a discovered family, or an
entry whose exactness depends on its config, like OPT's `do_layer_norm_before`), it is
checked once per layer on the loaded model: a float32 copy of the block runs on captured
inputs with and without a bias, and the shift must equal the vector to 1e-5 (relative
RMS). Otherwise bake refuses and names the reason.

This module imports nothing else of steer_heal, so every other module can use it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import InputError

ATTR = "_steer_heal_architecture"  # the resolved (or overridden) architecture, on the plain model
FOLD_ATTR = "_steer_heal_fold"  # {layer: "" if the bias fold was verified exact, else the reason}
FOLD_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Family:
    """A verified table entry: block list paths (relative to the causal-LM wrapper), the
    residual writer's path inside a block (None: no exact bias fold), and why not."""

    blocks: tuple[str, ...]
    writer: str | None
    why_no_bake: str = ""
    check_bake: bool = False  # exactness depends on the config: verify on the loaded model
    tiny: bool = True  # the tests build a tiny random model of it (multimodal wrappers: no)


@dataclass(frozen=True)
class Architecture:
    """The resolved layout of one loaded model."""

    model_type: str
    blocks: str  # path from the plain transformers model to the block ModuleList
    writer: str | None  # path inside a block to the MLP's output linear; None: bake refuses
    source: str  # "override", "registered", "table" or "discovered"
    why_no_bake: str = ""
    check_bake: bool = False  # verify the bias fold on the loaded model before baking


POST_NORM = (
    "post-norm: the MLP output passes a norm ({}) before the residual add, so a bias cannot reproduce h + coeff*v"
)
MULTIPLIER = "multiplier: the MLP output is scaled by residual_multiplier before the residual add"
MOE = "MoE: the MLP output is a routed, gated sum of experts, so no single bias adds coeff*v"
_USE_HOOKS = "; use vec.apply(model, coeff) (hooks) instead"

_LAYERS = ("model.layers",)
FAMILIES: dict[str, Family] = {
    "llama": Family(_LAYERS, "mlp.down_proj"),
    "mistral": Family(_LAYERS, "mlp.down_proj"),
    "qwen2": Family(_LAYERS, "mlp.down_proj"),
    "qwen3": Family(_LAYERS, "mlp.down_proj"),
    "phi3": Family(_LAYERS, "mlp.down_proj"),
    "gemma": Family(_LAYERS, "mlp.down_proj"),
    "gemma2": Family(_LAYERS, None, POST_NORM.format("post_feedforward_layernorm")),
    "gemma3_text": Family(_LAYERS, None, POST_NORM.format("post_feedforward_layernorm")),
    "gemma3": Family(
        ("model.language_model.layers", "language_model.model.layers"),
        None,
        POST_NORM.format("post_feedforward_layernorm"),
        tiny=False,
    ),
    "smollm3": Family(_LAYERS, "mlp.down_proj"),
    "olmo": Family(_LAYERS, "mlp.down_proj"),
    "olmo2": Family(_LAYERS, None, POST_NORM.format("post_feedforward_layernorm")),
    "granite": Family(_LAYERS, None, MULTIPLIER),
    "cohere": Family(_LAYERS, "mlp.down_proj"),
    "cohere2": Family(_LAYERS, "mlp.down_proj"),
    "glm4": Family(_LAYERS, None, POST_NORM.format("post_mlp_layernorm")),
    "stablelm": Family(_LAYERS, "mlp.down_proj"),
    "starcoder2": Family(_LAYERS, "mlp.c_proj"),
    "phi": Family(_LAYERS, "mlp.fc2"),
    "qwen2_moe": Family(_LAYERS, None, MOE),
    "qwen3_moe": Family(_LAYERS, None, MOE),
    "mixtral": Family(_LAYERS, None, MOE),
    "gpt_oss": Family(_LAYERS, None, MOE),
    "gpt2": Family(("transformer.h",), "mlp.c_proj"),
    "gpt_neox": Family(("gpt_neox.layers",), "mlp.dense_4h_to_h"),
    "bloom": Family(("transformer.h",), "mlp.dense_4h_to_h"),
    "falcon": Family(("transformer.h",), "mlp.dense_4h_to_h"),
    # OPT-350m normalises after the residual add (do_layer_norm_before=False): checked per model
    "opt": Family(("model.decoder.layers",), "fc2", check_bake=True),
}

_REGISTERED: dict[str, Family] = {}


def register_family(model_type: str, blocks: str, writer: str | None = None, why_no_bake: str = "") -> None:
    """Tell steer_heal where every model of `model_type` keeps its blocks (and, to allow
    bake, its residual writer: verified on each loaded model before the first bake)."""
    if not model_type or not blocks:
        raise InputError("register_family needs a model_type and a blocks path, e.g. ('mymodel', 'model.layers')")
    _REGISTERED[model_type] = Family(
        (blocks,), writer, why_no_bake or "no writer was registered", check_bake=writer is not None
    )


def known(model_type: str | None) -> bool:
    """Whether the table or a registration says where this model type keeps its blocks."""
    return model_type in FAMILIES or model_type in _REGISTERED


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def text_config(config):
    """The language model's config (multimodal configs keep it under `text_config`)."""
    return getattr(config, "text_config", None) or config


def get_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def hidden_size(model: nn.Module) -> int:
    config = text_config(unwrap(model).config)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        raise InputError("model config has no hidden_size / n_embd")
    return int(size)


def _depth(config) -> int | None:
    config = text_config(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------- resolution


def set_architecture(model: nn.Module, blocks: str | None = None, writer: str | None = None) -> Architecture:
    """The override tier: use `blocks` (a ModuleList path from the plain model, e.g.
    "model.layers") and `writer` (a linear's path inside a block, e.g. "mlp.down_proj")
    for this model. A writer given here is verified on the model before the first bake."""
    base = unwrap(model)
    if blocks is None and writer is None:
        return architecture(model)
    resolved = architecture(model) if blocks is None else None
    path = blocks if blocks is not None else resolved.blocks
    found = get_path(base, path)
    if found is None:
        raise InputError(f"blocks={path!r} does not exist in this {type(base).__name__}; name a ModuleList path")
    if not isinstance(found, nn.ModuleList) or len(found) == 0:
        raise InputError(f"blocks={path!r} is a {type(found).__name__}, not a non-empty nn.ModuleList of blocks")
    if writer is not None and _linear_width(get_path(found[0], writer)) is None:
        raise InputError(f"writer={writer!r} is not a linear layer inside block 0 ({type(found[0]).__name__})")
    model_type = str(getattr(base.config, "model_type", "unknown"))
    arch = Architecture(
        model_type,
        path,
        writer if writer is not None else (resolved.writer if resolved else None),
        "override",
        "" if writer is not None else "no writer was given with blocks=; pass writer= to allow bake",
        check_bake=True,
    )
    setattr(base, ATTR, arch)
    if hasattr(base, FOLD_ATTR):
        delattr(base, FOLD_ATTR)
    return arch


def architecture(model: nn.Module) -> Architecture:
    """The model's layout: override, registered, table, then discovery (cached on the model)."""
    base = unwrap(model)
    cached = getattr(base, ATTR, None)
    if isinstance(cached, Architecture):
        return cached
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    arch = None
    for source, table in (("registered", _REGISTERED), ("table", FAMILIES)):
        family = table.get(model_type)
        if family is None:
            continue
        for path in family.blocks:
            blocks = get_path(base, path)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                arch = Architecture(model_type, path, family.writer, source, family.why_no_bake, family.check_bake)
                break
        if arch is None:
            raise InputError(
                f"could not find the decoder blocks of this {model_type} model at {family.blocks}; "
                "pass blocks='path.to.layers' (--blocks)"
            )
        break
    if arch is None:
        arch = discover(base)
    setattr(base, ATTR, arch)
    return arch


def discover(model: nn.Module) -> Architecture:
    """Tier 3: find the blocks and the writer from the module structure alone."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    model_type = str(getattr(config, "model_type", None) or type(base).__name__)
    depth = _depth(config) if config is not None else None
    declared = set(getattr(base, "_no_split_modules", None) or ())
    lists = [
        (name, module)
        for name, module in base.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (depth is None or len(module) == depth)
    ]
    preferred = [(n, m) for n, m in lists if type(m[0]).__name__ in declared]
    candidates = preferred or lists
    if len(candidates) != 1:
        found = ", ".join(f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in candidates) or "none"
        raise InputError(
            f"cannot find the decoder blocks of this {model_type} model: looked for one nn.ModuleList of "
            f"num_hidden_layers={depth} blocks, found {found}; pass blocks='path.to.layers' (--blocks)"
        )
    path, blocks = candidates[0]
    writer, why = discover_writer(blocks[0], hidden_size(base), config)
    return Architecture(model_type, path, writer, "discovered", why, check_bake=writer is not None)


def _experts(config) -> int:
    config = text_config(config)
    counts = [
        getattr(config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    ]
    return max([c for c in counts if isinstance(c, int)] or [0])


def _linear_width(module: object) -> int | None:
    """The output width of a linear (nn.Linear, GPT-2's Conv1D, or a peft wrapper of one)."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return int(module.nf)
    return None


def discover_writer(block: nn.Module, width: int, config) -> tuple[str | None, str]:
    """The one linear in `block`, outside attention, whose output is `width` wide; else
    (None, why). peft's own sub-layers (base_layer, lora_A/B) are not candidates."""
    names = []
    for name, module in block.named_modules():
        parts = name.split(".")
        if not name or any(p in ("base_layer", "lora_A", "lora_B") for p in parts):
            continue
        if any("attn" in p or "attention" in p for p in parts):
            continue
        if _linear_width(module) == width:
            names.append(name)
    if len(names) == 1:
        return names[0], ""
    if _experts(config) > 1:
        return None, MOE
    found = ", ".join(names) if names else "none"
    return None, f"no single linear writes the MLP output (found {found}); pass writer='path.in.block' (--writer)"


# ---------------------------------------------------------------- the pieces callers use


def family_of(model: nn.Module) -> tuple[str, Architecture]:
    """`(model_type, Architecture)`; raises with the override to pass when blocks are not found."""
    arch = architecture(model)
    return arch.model_type, arch


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in depth order; a block's output is the residual stream."""
    arch = architecture(model)
    blocks = get_path(unwrap(model), arch.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise InputError(f"{arch.blocks!r} is no longer a ModuleList of blocks in this model; pass blocks= again")
    return blocks


def n_layers(model: nn.Module) -> int:
    return len(decoder_blocks(model))


def residual_writer(model: nn.Module, layer: int) -> nn.Module:
    """The linear layer whose output block `layer` adds into the residual stream.

    Raises (naming the reason) when no exact bias fold exists. Under peft, returns the
    wrapped base layer, so a bias lands in the frozen weights.
    """
    arch = architecture(model)
    if arch.writer is None:
        raise InputError(f"cannot bake a vector into this {arch.model_type} model: {arch.why_no_bake}{_USE_HOOKS}")
    module = get_path(decoder_blocks(model)[layer], arch.writer)
    if _linear_width(module) is None:
        raise InputError(f"{arch.model_type} block {layer} has no linear at {arch.writer!r}")
    if arch.check_bake:
        why = fold_check(model, layer)
        if why:
            raise InputError(f"cannot bake a vector into this {arch.model_type} model: {why}{_USE_HOOKS}")
    base_layer = getattr(module, "base_layer", None)
    return base_layer if isinstance(base_layer, nn.Module) else module


class _Captured(Exception):
    pass


def _to_float32(value):
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_to_float32(v) for v in value)
    if isinstance(value, list):
        return [_to_float32(v) for v in value]
    return value


def _first(output) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def fold_error(model: nn.Module, layer: int, writer: str | None = None) -> float:
    """Relative RMS error of the bias fold at block `layer`: a float32 copy of the block runs
    on the inputs the model gives it (8 tokens) with and without a bias of the hidden
    states' size on the writer (default: the architecture's); the shift must equal the
    bias at every position."""
    writer_path = writer or architecture(model).writer
    if writer_path is None:
        raise InputError("no writer to check; pass writer='path.in.block'")
    base = unwrap(model)
    block = decoder_blocks(model)[layer]
    captured: dict[str, object] = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Captured

    embed = base.get_input_embeddings()
    device = next((p.device for p in embed.parameters() if p.device.type != "meta"), torch.device("cpu"))
    vocab = int(embed.weight.shape[0])
    ids = (torch.arange(8, device=device) * 7 + 3).remainder(vocab).unsqueeze(0)
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    was_training = base.training
    try:
        base.eval()
        with torch.no_grad():
            base(input_ids=ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
        base.train(was_training)
    if "args" not in captured:
        raise InputError(f"block {layer} did not run in a forward pass; cannot check the bias fold")
    args = _to_float32(captured["args"])
    kwargs = {k: _to_float32(v) for k, v in captured["kwargs"].items()}
    for key in ("past_key_values", "past_key_value", "layer_past"):
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    twin = copy.deepcopy(block).float().eval()
    with torch.no_grad():
        plain = _first(twin(*args, **kwargs))
        writer = get_path(twin, writer_path)
        writer = getattr(writer, "base_layer", writer)
        generator = torch.Generator().manual_seed(0)
        v = torch.randn(plain.shape[-1], generator=generator).to(plain.device)
        v = v * (plain.pow(2).mean().sqrt() * math.sqrt(plain.shape[-1]) / v.norm())
        if writer.bias is None:
            writer.bias = nn.Parameter(v.clone(), requires_grad=False)
        else:
            writer.bias.add_(v)
        shifted = _first(twin(*args, **kwargs))
    err = (shifted - plain - v).pow(2).mean().sqrt() / v.pow(2).mean().sqrt()
    return float(err)


def fold_check(model: nn.Module, layer: int) -> str:
    """ "" if baking at `layer` is exact on this model (checked once, then cached), else why not."""
    base = unwrap(model)
    checked = getattr(base, FOLD_ATTR, None)
    if checked is None:
        checked = {}
        setattr(base, FOLD_ATTR, checked)
    if layer not in checked:
        checked[layer] = fold_verdict(model, layer)
    return checked[layer]


def fold_verdict(model: nn.Module, layer: int, writer: str | None = None) -> str:
    """ "" if a bias on `writer` (default: the architecture's) reproduces a shift of block
    `layer`'s output within FOLD_TOLERANCE, else the reason (uncached)."""
    try:
        err = fold_error(model, layer, writer)
    except Exception as exc:  # e.g. an attention kernel without float32 support
        return f"could not verify the bias fold at layer {layer} ({type(exc).__name__}: {exc})"
    return "" if err <= FOLD_TOLERANCE else _why_inexact(unwrap(model), layer, err)


def _why_inexact(base: nn.Module, layer: int, err: float) -> str:
    config = getattr(base, "config", None)
    measured = f" (the fold is off by {err:.2g} relative to the vector at layer {layer})"
    if _experts(config) > 1:
        return MOE + measured
    multiplier = getattr(text_config(config), "residual_multiplier", None)
    if isinstance(multiplier, (int, float)) and multiplier != 1:
        return MULTIPLIER + f" ({multiplier})" + measured
    block = decoder_blocks(base)[layer]
    norms = [
        n
        for n, _ in block.named_modules()
        if "norm" in n.lower() and any(k in n.lower() for k in ("feedforward", "mlp", "ffn", "final"))
    ]
    if norms or getattr(config, "do_layer_norm_before", True) is False:
        return POST_NORM.format(", ".join(norms) or "after the residual add") + measured
    return "something between the writer and the residual add changes the shift" + measured
