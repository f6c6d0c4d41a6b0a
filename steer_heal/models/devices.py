"""Where a model runs and in which precision: `--device` and `--dtype`, `auto` included.

    device  auto | cpu | cuda | cuda:N | mps
    dtype   auto | float32 | bfloat16 | float16

`auto` picks what the machine has: a CUDA GPU in bfloat16 (float16 where the card has no
bfloat16), Apple's `mps` in float32 (its half-precision kernels are not checked here), else
the CPU in float32. `resolve` says in one line what it chose (the command line prints it on
stderr) and refuses, in one line naming the fix, a device that is not visible or a dtype the
device cannot run.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..vocab import DEVICE_NAMES, DEVICE_PATTERN, DTypeName, choices

DTYPE_NAMES = choices(DTypeName)


def check_device_name(device: str) -> str:
    if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
        raise InputError(f"unknown device {device!r}; valid: {', '.join(DEVICE_NAMES)}")
    return device


def check_dtype_name(dtype: str) -> str:
    if dtype not in DTYPE_NAMES:
        raise InputError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_NAMES)}")
    return dtype


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    why: str  # one line: what was asked and what was chosen

    def __str__(self) -> str:
        return self.why


def _mps() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> Placement:
    """A concrete device and dtype for the names given (see the module docstring)."""
    if isinstance(device, torch.device):
        device = str(device)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    check_device_name(device)
    check_dtype_name(dtype)
    asked = f"--device {device} --dtype {dtype}"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else ("mps" if _mps() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA device is visible to torch; use --device cpu (or auto)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise InputError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible; use cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    if device == "mps" and not _mps():
        raise InputError("--device mps: Apple's Metal backend is not available here; use --device cpu (or auto)")
    on = torch.device(device)
    if dtype == "auto":
        if on.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype == "bfloat16" and on.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(
            f"--dtype bfloat16: {torch.cuda.get_device_name(on)} has no bfloat16; use --dtype float16 or float32"
        )
    if dtype == "float16" and on.type == "cpu":
        raise InputError(
            "--dtype float16 on the CPU is slow and loses precision in its matmuls; use float32 (or bfloat16)"
        )
    chosen = f"{on} in {dtype}"
    return Placement(on, getattr(torch, dtype), f"{chosen} (asked {asked})")


def attention_backends(device: torch.device) -> AbstractContextManager:
    """The scaled-dot-product-attention kernels the loop runs on `device`, scoped to a `with`
    block (torch's flags are restored on exit, also on errors).

    On CUDA: flash, memory-efficient and math, without cuDNN. cuDNN attention builds a graph
    for each new shape (sglang PR 4650 and mlx PR 2743 describe the cost), and a loop round
    is nearly all new shapes (every decode step's key length, every heal batch's padding):
    on one H200 with SmolLM2-135M its host time was 0.63 ms per forward call and 11.5 ms per
    backward call (torch profiler, benchmarks/gpu/gpu_profile.py), and rounds without it ran
    faster (76.1 s with it between 60.7 s and 62.8 s without, docs/benchmarks.md).
    Elsewhere: torch's own choice."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
