"""Healing: distil the kept completions into a fresh LoRA adapter with a regulariser toward a
reference model, and fold the rounds so the student, the previous student and the base share one set of weights.

- `train`: `heal`, the training loop, and its settings and logs;
- `regularizers`: NLL, KLRev, KLFwd, SpectralNorm, WeightDecay, Anchor (the `Regularizer` protocol);
- `lora`: `LoraSettings`, the adapter's shape and target layers;
- `encoding`: completions as token sequences with their completion positions;
- `adapter`: a round as a standard peft adapter directory with provenance;
- `history`: `History`, the folded rounds (student, previous student, base) from one set of weights.
"""

from .adapter import Adapter
from .encoding import completion_nll, encode_completions
from .history import History
from .lora import LoraSettings
from .regularizers import NLL, Anchor, KLFwd, KLRev, Penalty, RegContext, Regularizer, SpectralNorm, WeightDecay
from .train import HealDiverged, HealResult, TrainSettings, heal

__all__ = [
    "NLL",
    "Adapter",
    "Anchor",
    "HealDiverged",
    "HealResult",
    "History",
    "KLFwd",
    "KLRev",
    "LoraSettings",
    "Penalty",
    "RegContext",
    "Regularizer",
    "SpectralNorm",
    "TrainSettings",
    "WeightDecay",
    "completion_nll",
    "encode_completions",
    "heal",
]
