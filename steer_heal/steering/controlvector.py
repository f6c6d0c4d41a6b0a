"""A steering vector as a llama.cpp control vector (GGUF), and back.

llama.cpp's reader (`common_control_vector_load_one` in common/common.cpp, applied by
`llama_adapter_cvec`) takes every tensor named `direction.N`, F32 and one-dimensional of
the model's width, and adds `strength * direction.N` to the output of layer N, counted
from 0 as the model's blocks are, at every position. That is our `h_l + coeff * v_l` with
l = N, so a layer keeps its number. llama.cpp has no slot for layer 0 (N must be >= 1),
so a vector with a direction at block 0 cannot be exported.

Metadata: `general.architecture = "controlvector"`, `controlvector.model_hint` (the HF
model type) and `controlvector.layer_count` (the number of directions), as other
control-vector writers set them; and steer_heal's own provenance (`steer_heal.*`: model
id, hidden size, block count, persona pair), so `from_gguf` gives back the same vector
bit for bit.

Coefficients: our vectors are not normalised (coefficient 1.0 is the persona pair's natural
shift), and llama.cpp's `--control-vector-scaled FILE S` multiplies by S exactly as our
`coeff` does; `to_gguf(coeff=c)` writes `c * v` so that strength 1.0 means coefficient c.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import FileFormatError, InputError, MissingFile, ModelMismatch
from ..io import atomic_write
from .hooks import finite_delta

ARCH = "controlvector"
_NAME = re.compile(r"^direction\.(\d+)$")


def write_control_vector(
    path: str | os.PathLike,
    directions: dict[int, torch.Tensor],
    model_hint: str,
    provenance: dict[str, str],
    coeff: float = 1.0,
) -> Path:
    """Write `{layer: coeff * v}` as `direction.<layer>` tensors (F32), atomically."""
    import gguf

    if 0 in directions:
        raise InputError(
            "llama.cpp control vectors have no slot for layer 0 (direction.N needs N >= 1); drop layer 0 from the "
            "vector (e.g. extract with layers starting at 1)"
        )
    if not directions:
        raise InputError("the vector has no directions to export")
    if not bool(torch.isfinite(torch.tensor(float(coeff), dtype=torch.float32))):
        raise InputError(f"coeff {coeff} is not finite in float32, the type the file stores it in; use a smaller coeff")
    for layer, v in directions.items():  # the file holds F32: a coefficient finite as a double may not be
        finite_delta((float(coeff) * v).float(), coeff, layer)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(directions))
        writer.add_float32("steer_heal.coeff", float(coeff))
        for key, value in sorted(provenance.items()):
            writer.add_string(f"steer_heal.{key}", str(value))
        for layer in sorted(directions):
            values = directions[layer].detach().float().cpu()
            if coeff != 1.0:
                values = float(coeff) * values
            writer.add_tensor(f"direction.{layer}", values.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)


def read_control_vector(path: str | os.PathLike) -> tuple[dict[int, torch.Tensor], dict[str, str], float]:
    """`({layer: direction}, steer_heal provenance, coeff written)` from a control-vector GGUF
    (ours or another writer's: then provenance is empty and coeff 1.0)."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise MissingFile(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError... on bad files
        raise FileFormatError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); re-export it"
        ) from None
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = _NAME.match(tensor.name)
        if match is None:
            continue
        layer = int(match.group(1))
        if layer == 0:
            raise FileFormatError(f"{path}: tensor direction.0 is invalid in a llama.cpp control vector (N >= 1)")
        data = np.asarray(tensor.data)
        if data.dtype != np.float32 or data.ndim != 1:
            raise FileFormatError(f"{path}: {tensor.name} must be a 1-D F32 tensor, got {data.dtype} {data.shape}")
        directions[layer] = torch.from_numpy(data.copy())
    if not directions:
        raise FileFormatError(f"{path} has no direction.N tensors; it is not a llama.cpp control vector")
    widths = {v.numel() for v in directions.values()}
    if len(widths) != 1:
        raise FileFormatError(f"{path}: direction tensors differ in width ({sorted(widths)})")
    provenance, coeff = {}, 1.0
    for name, field in reader.fields.items():
        if name == "steer_heal.coeff":
            coeff = float(field.parts[field.data[0]][0])
        elif name.startswith("steer_heal."):
            provenance[name.removeprefix("steer_heal.")] = bytes(field.parts[field.data[0]]).decode("utf-8")
    return dict(sorted(directions.items())), provenance, coeff


def check_against(path: str | os.PathLike, width: int, depth: int, hidden: int, layers: int) -> None:
    """Refuse a control vector whose width or depth does not fit the model, with both numbers."""
    if width != hidden:
        raise ModelMismatch(f"{path}: control vector width {width} but the model's hidden size is {hidden}")
    if depth >= layers:
        raise ModelMismatch(f"{path}: control vector reaches layer {depth} but the model has {layers} layers")
