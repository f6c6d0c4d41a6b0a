"""steer-heal: distil activation steering into LoRA adapters and heal the incoherence.

Data flows one way: model -> vector -> completions -> verdicts -> adapter -> history ->
evaluation -> events.
"""

from ._version import __version__
from .dose import collect, walk_dose
from .filters import AllOf, FilterReport, Reason, Verdict, default_filter
from .generate import Completion, generate
from .heal import TrainSettings, heal
from .history import History
from .loading import load_model
from .lora import LoraSettings
from .model import Depth
from .regularizers import NLL, KLFwd, KLRev, SpectralNorm, WeightDecay
from .sampling import Sampling
from .slot import SteeringSlot
from .vector import SteeringVector

__all__ = [
    "AllOf",
    "Completion",
    "Depth",
    "FilterReport",
    "History",
    "KLFwd",
    "KLRev",
    "LoraSettings",
    "NLL",
    "Reason",
    "Sampling",
    "SpectralNorm",
    "SteeringSlot",
    "SteeringVector",
    "TrainSettings",
    "Verdict",
    "WeightDecay",
    "__version__",
    "collect",
    "default_filter",
    "generate",
    "heal",
    "load_model",
    "walk_dose",
]
