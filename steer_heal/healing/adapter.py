"""`Adapter`: one heal round's LoRA as a standard peft adapter directory, with provenance.

`adapter_config.json` is peft's own file (canonicalised: sorted keys and `target_modules`,
so identical adapters give identical bytes) and `adapter_model.safetensors` holds the
weights, with steer_heal metadata (model, round, regularisers, version) and a fingerprint
of the config's compute-relevant keys in its header. `Adapter.load` refuses a config that
no longer matches its weights (e.g. `lora_alpha` edited from 8 to 800), unreadable JSON and
truncated weights, each in one line naming the file. Both files are written atomically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from ..errors import FileFormatError, MissingFile
from ..io import atomic_write_text, read_safetensors, save_safetensors, temp_dir

_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"
_FINGERPRINT_KEY = "steer_heal.config_sha256"
# the adapter_config.json keys that change what the weights compute (a path or a revision does not)
_COMPUTE_KEYS = (
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "fan_in_fan_out",
    "use_rslora",
    "use_dora",
    "bias",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "lora_bias",
)


def config_fingerprint(record: dict) -> str:
    """sha256 of the adapter config's compute-relevant keys, canonically written."""
    picked = {k: record.get(k) for k in _COMPUTE_KEYS}
    if isinstance(picked["target_modules"], list):
        picked["target_modules"] = sorted(picked["target_modules"])
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Adapter:
    """One round's LoRA: its peft config and state dict (peft keys, CPU) plus provenance."""

    config: object  # peft.LoraConfig
    state: dict[str, Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a standard peft adapter directory (files replaced atomically).

        The config is written by peft's own writer, then canonicalised (sorted keys and
        `target_modules`, so identical adapters give identical bytes), and its fingerprint
        goes into the weights' metadata: `load` refuses a config edited after the fact.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        config.inference_mode = True
        staging = temp_dir(path, "config")
        try:
            config.save_pretrained(str(staging))  # peft's own writer: the standard file
            record = json.loads((staging / _CONFIG_FILE).read_text(encoding="utf-8"))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(record.get("target_modules"), list):
            record["target_modules"] = sorted(record["target_modules"])
        atomic_write_text(path / _CONFIG_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(self.state.items())}
        meta = {"format": "pt", _FINGERPRINT_KEY: config_fingerprint(record)}
        meta.update({f"steer_heal.{k}": str(v) for k, v in self.meta.items()})
        meta = dict(sorted(meta.items()))
        save_safetensors(path / _WEIGHTS_FILE, tensors, meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Adapter:
        from peft import LoraConfig

        path = Path(path)
        config_file, weights_file = path / _CONFIG_FILE, path / _WEIGHTS_FILE
        if not config_file.exists() or not weights_file.exists():
            raise MissingFile(f"{path} is not a peft adapter directory (needs {_CONFIG_FILE} and {_WEIGHTS_FILE})")
        try:
            record = json.loads(config_file.read_text(encoding="utf-8"))
            config = LoraConfig.from_pretrained(str(path))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as exc:
            raise FileFormatError(
                f"{config_file} is not a readable adapter config ({exc}); re-save the adapter"
            ) from None
        header, state = read_safetensors(weights_file, "adapter")
        expected = header.get(_FINGERPRINT_KEY)
        if expected is not None and expected != config_fingerprint(record):
            raise FileFormatError(
                f"{config_file} does not match the weights it sits beside (edited after saving: rank, alpha or "
                "targets differ from training); restore the saved config or re-save the adapter"
            )
        meta = {k.removeprefix("steer_heal."): v for k, v in header.items() if k.startswith("steer_heal.")}
        meta.pop("config_sha256", None)
        return cls(config=config, state=state, meta=meta)
