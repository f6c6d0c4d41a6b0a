"""steer-heal: distil activation steering into LoRA adapters and heal the incoherence.

Data flows one way: model -> vector -> completions -> verdicts -> adapter -> history ->
evaluation -> events.
"""

__version__ = "0.1.0"

from .model import load_model  # noqa: E402
from .vector import SteeringVector  # noqa: E402
from .generate import Completion, generate  # noqa: E402

__all__ = ["Completion", "SteeringVector", "generate", "load_model", "__version__"]
