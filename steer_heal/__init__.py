"""steer-heal: distil activation steering into LoRA adapters and heal the incoherence.

Data flows one way: model -> vector -> completions -> verdicts -> adapter -> history ->
evaluation -> events, and the rooms follow it: `models/` (load and reach into a model),
`steering/` (vectors, hooks, steered generation), `filters/` (verdicts, dose control),
`healing/` (LoRA distillation, regularisers, folded history), `evaluate/` (probes),
`run/` (the loop, its config, run directory, figures and exports); `data/` holds our prompts.
"""

from ._version import __version__
from .filters import AllOf, FilterReport, Reason, Verdict, collect, default_filter, walk_dose
from .healing import NLL, History, KLFwd, KLRev, LoraSettings, SpectralNorm, TrainSettings, WeightDecay, heal
from .models import Depth, load_model
from .sampling import Sampling
from .steering import Completion, SteeringSlot, SteeringVector, generate

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
