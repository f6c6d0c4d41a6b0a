"""`LoraSettings`: which linears of which decoder blocks get a LoRA, with its rank and alpha.

peft's scale is alpha / r. Targets are resolved to full module names inside the chosen
blocks (`layers`, a layer spec as in `steer_heal.models.model.resolve_layers`): every linear
(`"all-linear"`, GPT-2's Conv1D included) or those whose leaf name is listed. The peft
config starts B = 0, so a fresh adapter is a no-op until trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..errors import InputError
from ..models.model import Depth, LayerSpec, decoder_blocks, model_id, resolve_layers, unwrap
from ..vocab import Number


@dataclass(frozen=True)
class LoraSettings:
    """Which linears get a LoRA, and its rank and alpha (peft's scale is alpha / r)."""

    r: int = 32
    alpha: Number = 64.0
    layers: LayerSpec = Depth(0.2, 0.8)
    targets: str | tuple[str, ...] = "all-linear"  # or leaf names, e.g. ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise InputError(f"LoRA rank r must be an int >= 1, got {self.r!r}")
        if not (math.isfinite(float(self.alpha)) and self.alpha > 0):
            raise InputError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            raise InputError(f"targets must be 'all-linear' or a tuple of module names, got {self.targets!r}")

    def target_names(self, model: nn.Module) -> list[str]:
        """Full names of the linears to adapt inside the chosen decoder blocks."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from transformers.pytorch_utils import Conv1D

        base = unwrap(model)
        blocks = decoder_blocks(model)
        where = {id(m): n for n, m in base.named_modules()}
        names = []
        for index in resolve_layers(self.layers, len(blocks)):
            block_name = where[id(blocks[index])]
            wrapped = [n for n, m in blocks[index].named_modules() if isinstance(m, BaseTunerLayer)]
            for sub, module in blocks[index].named_modules():
                if not sub or any(sub.startswith(w + ".") for w in wrapped):
                    continue  # a LoRA layer's own pieces (base_layer, lora_A...) are not targets
                if not isinstance(module, (nn.Linear, Conv1D, BaseTunerLayer)):
                    continue
                if self.targets == "all-linear" or sub.rsplit(".", 1)[-1] in self.targets:
                    names.append(f"{block_name}.{sub}")
        if not names:
            raise InputError(
                f"no linear layer named {self.targets!r} in layers {self.layers!r}; check LoraSettings.targets"
            )
        return names

    def config(self, model: nn.Module):
        from peft import LoraConfig
        from transformers.pytorch_utils import Conv1D

        names = self.target_names(model)
        base = unwrap(model)
        modules = dict(base.named_modules())
        # GPT-2's Conv1D stores weights transposed; peft must know
        conv = any(isinstance(getattr(modules[n], "base_layer", modules[n]), Conv1D) for n in names)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            target_modules=names,
            lora_dropout=0.0,
            bias="none",
            init_lora_weights=True,
            fan_in_fan_out=conv,
            task_type="CAUSAL_LM",
            base_model_name_or_path=model_id(model),
        )
