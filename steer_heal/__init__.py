"""steer-heal: distil activation steering into LoRA adapters and heal the incoherence.

Data flows one way: model -> vector -> completions -> verdicts -> adapter -> history ->
evaluation -> events.
"""

from ._version import __version__
from .model import load_model  # noqa: E402
from .vector import SteeringVector  # noqa: E402
from .generate import Completion, generate  # noqa: E402
from .slot import SteeringSlot  # noqa: E402
from .filters import AllOf, Verdict, default_filter  # noqa: E402
from .dose import collect, walk_dose  # noqa: E402
from .regularizers import NLL, KLFwd, KLRev, SpectralNorm, WeightDecay  # noqa: E402
from .heal import LoraSettings, TrainSettings, heal  # noqa: E402
from .history import History  # noqa: E402

__all__ = [
    "AllOf", "Completion", "History", "KLFwd", "KLRev", "LoraSettings", "NLL", "SpectralNorm", "SteeringSlot",
    "SteeringVector", "TrainSettings", "Verdict", "WeightDecay", "__version__", "collect", "default_filter",
    "generate", "heal", "load_model", "walk_dose",
]
