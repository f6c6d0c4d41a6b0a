"""The library's vocabulary: names that are valid settings, written once.

The config validation, the command line's `click.Choice`s and the loop's registries all
read their lists from the `Literal` types here (`choices(Reference)` ->
`("base", "prev", "last_good")`), so a new name is added in one place.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from .errors import InputError

Number = float | int  # beartype, unlike PEP 484, does not let an int pass as a float

RegName = Literal["klrev", "klfwd", "nll", "spectral"]  # the loop's main regulariser
Aggregation = Literal["mean", "rmse", "p95", "max"]  # per-completion divergence -> one number
Reference = Literal["base", "prev", "last_good"]  # which folded state heal is anchored to
AnchorName = Literal["none", "klrev", "klfwd"]  # the heal's anchor on the base's neutral text, or none
CalibrateOn = Literal["base", "student"]  # whose unsteered completions set the filter's thresholds
SteerHow = Literal["hooks", "bias"]  # forward hooks or a baked bias
Operator = Literal["add", "ablate", "norm_add"]  # how a direction changes a block's output (steering.operators)
Positions = Literal["all", "prompt", "generated"]  # which tokens a hook changes, besides a slice (steering.positions)
PairRead = Literal["last", "mean"]  # where a contrastive pair's activation is read (steering.pairs)
PairMethod = Literal["mean_diff", "pca"]  # how pair differences become a direction (steering.pairs)
ItemSet = Literal["bundled", "mfv", "both"]  # which vignettes the probes use
Schedule = Literal["cosine", "linear", "constant"]  # heal's learning-rate decay
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]  # steer_heal.models.devices
DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N", "mps")  # a device is not a closed list: cuda:N
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def choices(names) -> tuple[str, ...]:
    """The values of a `Literal` type, in order."""
    return tuple(get_args(names))


def check_choice(what: str, value: object, names) -> str:
    """`value` if it is one of the `Literal`'s names, else a one-line error listing them."""
    valid = choices(names)
    if value not in valid:
        quoted = [repr(v) for v in valid]
        options = " or ".join(quoted) if len(quoted) == 2 else "one of " + ", ".join(quoted)
        raise InputError(f"{what} must be {options}, got {value!r}")
    return value  # type: ignore[return-value]
