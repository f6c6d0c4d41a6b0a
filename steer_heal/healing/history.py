"""Folded heal rounds over one set of weights: base, previous and current student.

Every folded round i is a peft LoRA adapter (`round_000`, `round_001`, ...) injected into
the same model. The base weights W are never written. With a set S of active rounds a
wrapped linear computes

    y = W x + sum_{i in S} scale_i * B_i (A_i x)

so the student after round r is S = {0..r}, the previous student {0..r-1}, `first(k)` is
{0..k-1}, and `scaled(c)` is the student with scale_r replaced by c * scale_r. The folded
rounds run as one concatenated low-rank pass per wrapped layer (`fused.FusedRounds`: a
forward costs W plus O(sum_i rank_i) in one pass, however many rounds), and every view is
that pass with other columns live, so views with equal updates agree bitwise; only the
adapter being trained runs through peft. The base is the adapters disabled: each wrapped
layer then calls its untouched base layer, so base logits are bitwise equal to the model
before any round, with no second copy of W. (Merging into W and unmerging is not exact in floating
point, W + dW - dW != W, and keeping W to restore it is a second copy: hence no merges.)

Outside its context managers the model runs as the current student (all folded rounds).
Every context restores the previous adapter state on exit, exceptions included. Scales are
restored by writing back the saved Python float, so `scaled` is exact too.

Rounds are saved as standard peft adapter directories (`adapter_config.json` and
`adapter_model.safetensors`, loadable with `PeftModel.from_pretrained`), carrying
steer_heal metadata in the safetensors header; `export_merged` writes a plain HF
checkpoint of the current student (W + sum_i dW_i, computed off to the side).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..errors import InputError, ModelMismatch
from ..io import atomic_write_text
from ..models.model import family_of, hidden_size, model_id, n_layers, unwrap
from ..runtime import seeded
from ..vocab import Reference, choices
from .adapter import Adapter
from .fused import FusedRounds

FORMAT = "steer_heal.history/1"
REFERENCES = choices(Reference)


@dataclass
class Round:
    name: str
    meta: dict[str, str]
    coherence: float | None = None


@dataclass(frozen=True)
class TrainSlot:
    """The adapter being trained: its name, the LoRA layers holding it, its parameters."""

    name: str
    modules: dict[str, nn.Module]
    params: list[nn.Parameter]


class History:
    """Folded rounds of one model; the model is modified in place until `close()`."""

    def __init__(self, model: nn.Module) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = unwrap(model)
        family_of(model)  # fail early on unsupported architectures
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise InputError("History needs a model without peft adapters; pass the base model (PeftModel.unload())")
        self._model = model
        self._peft = None  # the PeftModel container, present while any adapter exists
        self._rounds: list[Round] = []
        self._n_good = 0
        self._active: tuple[str, ...] = ()
        self._disabled = False
        self._scale: float | None = None  # the last folded round's factor in `scaled` (None: as folded)
        self._fused = FusedRounds()  # the folded rounds, one pass per layer; peft runs only the trainable
        self._trainable: str | None = None
        self._grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
        self._layer_cache: list[tuple[str, nn.Module]] | None = None
        self._flags_set = False  # grad flags as `_set` leaves them; off whenever adapters come or go
        self._closed = False

    # ------------------------------------------------------------ state

    @property
    def model(self) -> nn.Module:
        """The model itself (same object as passed in), running as the current student."""
        self._check_open()
        return self._model

    @property
    def rounds(self) -> tuple[Round, ...]:
        return tuple(self._rounds)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self._rounds)

    @property
    def n_good(self) -> int:
        """k: the reference `last_good` is the first k rounds."""
        return self._n_good

    def __len__(self) -> int:
        return len(self._rounds)

    def _check_open(self) -> None:
        if self._closed:
            raise InputError("this History is closed; make a new one with History(model)")

    def _layers(self) -> list[tuple[str, nn.Module]]:
        from peft.tuners.lora import LoraLayer

        if self._layer_cache is None:
            self._layer_cache = [(n, m) for n, m in self._model.named_modules() if isinstance(m, LoraLayer)]
        return self._layer_cache

    def _set(self, active: tuple[str, ...], disabled: bool, scale: float | None = None) -> None:
        folded = set(self.names)
        through_peft = [name for name in active if name not in folded]  # the adapter in training, if any
        layers = self._layers()
        if self._flags_set:
            # Only which adapters run changes: the grad flags below are the same for every view (folded
            # rounds frozen, the one in training not). peft's own switch walks every adapter of every
            # layer (10.7 ms a switch at 30 layers with one folded round, 19.4 ms with four, on a
            # 2-core host: benchmarks/view_switch.py; 0.7 ms this way), and a heal switches around
            # every frozen forward, so the two fields it would end on are written directly;
            # tests/test_history.py checks that both ways leave the layers alike.
            for _, module in layers:
                module._disable_adapters = disabled
                module._active_adapter = list(through_peft)
        else:
            for _, module in layers:
                module.enable_adapters(not disabled)
                # inference_mode freezes every adapter; only the one in training gets grads back
                module.set_adapter(through_peft, inference_mode=True)
                if self._trainable is not None and self._trainable in module.lora_A:
                    module.lora_A[self._trainable].requires_grad_(True)
                    module.lora_B[self._trainable].requires_grad_(True)
            # the direct path needs peft's two fields (peft 0.17-0.21 have them); without: always this way
            self._flags_set = all(hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters") for _, m in layers)
        self._fused.show([name for name in active if name in folded], scale, disabled)
        self._active, self._disabled, self._scale = tuple(active), disabled, scale

    def _student(self) -> tuple[str, ...]:
        return self.names + ((self._trainable,) if self._trainable else ())

    @contextmanager
    def _using(
        self, active: tuple[str, ...], disabled: bool = False, scale: float | None = None
    ) -> Iterator[nn.Module]:
        self._check_open()
        saved = (self._active, self._disabled, self._scale)
        self._set(active, disabled, scale)
        try:
            yield self._model
        finally:
            self._set(*saved)

    # ------------------------------------------------------------ views

    def base(self):
        """The untouched model: every adapter off (bitwise equal logits)."""
        return self._using(self._active, disabled=True)

    def student(self):
        """All folded rounds (the current student)."""
        return self._using(self.names)

    def previous(self):
        """All folded rounds but the last (the base when fewer than two rounds exist)."""
        return self._using(self.names[:-1])

    def first(self, k: int):
        """The first k folded rounds."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(self):
            raise InputError(f"first(k) needs an int 0 <= k <= {len(self)} (the number of folded rounds), got {k!r}")
        return self._using(self.names[:k])

    @contextmanager
    def scaled(self, coeff: float) -> Iterator[nn.Module]:
        """The student with the last folded round's update multiplied by `coeff`."""
        coeff = float(coeff)
        if not math.isfinite(coeff):
            raise InputError(f"coeff must be a finite number, got {coeff}")
        if not self._rounds:
            raise InputError("scaled() needs at least one folded round; fold a heal result first")
        with self._using(self.names, scale=coeff):  # a B of its own for this factor: nothing to restore
            yield self._model

    def reference(self, name: str):
        """The heal reference: `base`, `prev` (all folded rounds) or `last_good` (first k)."""
        if name == "base":
            return self.base()
        if name == "prev":
            return self.student()
        if name == "last_good":
            return self.first(self._n_good)
        raise InputError(f"unknown reference {name!r}; choose one of {', '.join(REFERENCES)}")

    # ------------------------------------------------------------ adding and removing

    def _add(self, name: str, config) -> None:
        from peft import get_peft_model

        offloaded = sorted(
            {
                re.sub(r"^(.*?\.\d+)\..*$", r"\1", n.rsplit(".", 1)[0])
                for n, p in self._model.named_parameters()
                if p.device.type == "meta"
            }
        )
        if offloaded:  # peft would build LoRA weights on "meta" and fail deep inside
            raise InputError(
                f"cannot add LoRA adapters to offloaded layers ({', '.join(offloaded[:3])}"
                f"{', ...' if len(offloaded) > 3 else ''}): load the model with a device_map that keeps "
                "every layer on a GPU or the CPU (no 'disk' offload)"
            )
        config = copy.deepcopy(config)  # peft writes into configs it is given
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            if self._peft is None:
                self._peft = get_peft_model(self._model, config, adapter_name=name)
            else:
                self._peft.add_adapter(name, config)
        self._layer_cache, self._flags_set = None, False

    def _delete(self, name: str) -> None:
        self._peft.delete_adapter(name)
        self._layer_cache, self._flags_set = None, False
        if not self._peft.peft_config:
            # no adapters left: take the LoRA layers out and give back the base grad flags
            self._peft.unload()
            self._peft = None
            self._restore_grads()

    def _restore_grads(self) -> None:
        for name, p in self._model.named_parameters():
            if name in self._grad_flags:
                p.requires_grad_(self._grad_flags[name])

    @contextmanager
    def train_adapter(self, config) -> Iterator[TrainSlot]:
        """A fresh adapter active on top of the folded rounds, removed again on exit."""
        self._check_open()
        if self._trainable is not None:
            raise InputError("an adapter is already being trained on this History")
        name = "heal_in_progress"
        saved = (self._active, self._disabled, self._scale)
        self._add(name, config)
        self._trainable = name
        try:
            self._set(self._student(), False)
            modules = {n: m for n, m in self._layers() if name in m.lora_A}
            params = [p for m in modules.values() for p in (m.lora_A[name].weight, m.lora_B[name].weight)]
            yield TrainSlot(name, modules, params)
        finally:
            self._trainable = None
            self._set(*saved)  # inactive before it goes: peft would otherwise re-activate a folded round
            self._delete(name)

    def fold(self, adapter, allow_other_model: bool = False) -> int:
        """Add a round (an `Adapter` or a `HealResult`); the model becomes the new student. An
        adapter trained on another model id is refused unless `allow_other_model` (as vectors are)."""
        from peft import set_peft_model_state_dict

        self._check_open()
        adapter = getattr(adapter, "adapter", adapter)
        if not isinstance(adapter, Adapter):
            raise InputError(f"fold() takes a HealResult or an Adapter, got {type(adapter).__name__}")
        if self._trainable is not None:
            raise InputError("cannot fold while an adapter is being trained")
        bad = [k for k, v in adapter.state.items() if not torch.isfinite(v).all()]
        if bad:
            raise InputError(f"adapter has non-finite weights ({len(bad)} tensors, e.g. {bad[0]}); it cannot be folded")
        self._check_meta(adapter.meta, allow_other_model)
        index = len(self._rounds)
        name = f"round_{index:03d}"
        with seeded(None):  # peft initialises A randomly before we overwrite it: the caller's RNG is kept
            self._add(name, adapter.config)
        try:
            result = set_peft_model_state_dict(self._peft, adapter.state, adapter_name=name)
            unexpected = [k for k in result.unexpected_keys if "lora_" in k]
            missing = [k for k in result.missing_keys if f".{name}." in k]
            if unexpected or missing:
                raise InputError(
                    f"adapter does not fit this model ({len(missing)} missing, {len(unexpected)} unexpected keys, "
                    f"e.g. {(missing or unexpected)[0]}); fold it into the model it was trained on"
                )
        except RuntimeError as exc:  # size mismatch from load_state_dict
            self._delete(name)
            raise InputError(f"adapter does not fit this model: {str(exc).splitlines()[0]}") from None
        except ValueError:
            self._delete(name)
            raise
        self._rounds.append(Round(name, dict(adapter.meta)))
        self._fused.build(self._layers(), self.names)
        self._set(self._student(), False)
        return index

    def judge(self, coherence: float, threshold: float) -> bool:
        """Record the current student's coherence; k (`last_good`) advances to all rounds if it
        clears `threshold`, and stays where it was otherwise."""
        coherence, threshold = float(coherence), float(threshold)
        if not (math.isfinite(coherence) and math.isfinite(threshold)):
            raise InputError(f"coherence and threshold must be finite numbers, got {coherence} and {threshold}")
        if not self._rounds:
            raise InputError("judge() needs a folded round; fold a heal result first")
        self._rounds[-1].coherence = coherence
        if coherence >= threshold:
            self._n_good = len(self._rounds)
            return True
        return False

    def _check_meta(self, meta: dict[str, str], allow_other_model: bool = False) -> None:
        trained_on, this = meta.get("model_id", "unknown"), model_id(self._model)
        known = {"", "unknown"}
        if not allow_other_model and trained_on not in known and this not in known and trained_on != this:
            raise ModelMismatch(
                f"adapter was trained on model {trained_on!r} but this model is {this!r}; fold it into the model it was "
                "trained on, or pass allow_other_model=True (--allow-other-model) for a model of the same weights"
            )
        for key, actual in (("hidden_size", hidden_size(self._model)), ("n_layers", n_layers(self._model))):
            if key in meta and int(meta[key]) != actual:
                raise InputError(
                    f"adapter was trained on a model with {key}={meta[key]} (model {meta.get('model_id', '?')!r}) "
                    f"but this model has {key}={actual}; fold it into the model it was trained on"
                )

    # ------------------------------------------------------------ files

    def adapter(self, which: int | str) -> Adapter:
        """A folded round (by index) or any adapter by name, copied to CPU."""
        from peft import get_peft_model_state_dict

        self._check_open()
        if isinstance(which, int) and not isinstance(which, bool):
            if not -len(self) <= which < len(self):
                raise InputError(f"round {which} does not exist; this History has {len(self)} rounds")
            which = self.names[which]
        if self._peft is None or which not in self._peft.peft_config:
            raise InputError(f"no adapter named {which!r}; folded rounds: {list(self.names)}")
        state = get_peft_model_state_dict(self._peft, adapter_name=which, save_embedding_layers=False)
        meta = next((r.meta for r in self._rounds if r.name == which), {})
        return Adapter(
            copy.deepcopy(self._peft.peft_config[which]),
            {k: v.detach().to("cpu").clone() for k, v in state.items()},
            dict(meta),
        )

    def save_round(self, index: int, path: str | os.PathLike) -> Path:
        return self.adapter(index).save(path)

    def save(self, directory: str | os.PathLike) -> Path:
        """Every round as `round_NNN/` (peft adapter dirs) plus `history.json`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(self._rounds):
            self.save_round(i, directory / r.name)
        record = {
            "format": FORMAT,
            "version": __version__,
            "model_id": model_id(self._model),
            "hidden_size": hidden_size(self._model),
            "n_layers": n_layers(self._model),
            "n_good": self._n_good,
            "rounds": [{"name": r.name, "coherence": r.coherence} for r in self._rounds],
        }
        atomic_write_text(directory / "history.json", json.dumps(record, indent=2))
        return directory

    @classmethod
    def load(cls, model: nn.Module, directory: str | os.PathLike) -> History:
        """Rebuild a History saved with `save` on the same base model."""
        directory = Path(directory)
        try:
            record = json.loads((directory / "history.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{directory} has no readable history.json ({exc}); save one with History.save") from None
        if record.get("format") != FORMAT:
            raise InputError(f"{directory}/history.json is not a steer_heal history (format {record.get('format')!r})")
        hist = cls(model)
        try:
            hist._check_meta({k: str(record[k]) for k in ("hidden_size", "n_layers") if k in record})
            for r in record["rounds"]:
                hist.fold(Adapter.load(directory / r["name"]))
                hist._rounds[-1].coherence = r.get("coherence")
            hist._n_good = int(record.get("n_good", 0))
        except BaseException:
            hist.close()
            raise
        return hist

    def export_merged(self, path: str | os.PathLike, tok=None) -> Path:
        """A plain HF checkpoint of the current student: W + sum of the folded rounds' updates.

        The merged tensors are built on CPU, one module at a time; W itself is not touched.
        """
        self._check_open()
        path = Path(path)
        prefixes = {}
        for name, module in self._layers():
            rounds = [r for r in self.names if r in module.lora_A]
            if rounds:
                prefixes[f"{name}.base_layer."] = (module, rounds)
        state = {}
        for key, value in self._model.state_dict().items():
            if ".lora_" in key:
                continue
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is None:
                state[key] = value
                continue
            plain = key.replace(".base_layer.", ".", 1)
            module, rounds = prefixes[prefix]
            if key.endswith(".weight"):
                with torch.no_grad():
                    delta = sum(module.get_delta_weight(r).detach().float().cpu() for r in rounds)
                    state[plain] = (value.detach().float().cpu() + delta).to(value.dtype)
            else:
                state[plain] = value
        self._model.save_pretrained(path, state_dict=state)
        if tok is not None:
            tok.save_pretrained(path)
        return path

    # ------------------------------------------------------------ lifetime

    def close(self) -> nn.Module:
        """Remove every adapter and give the model back as it was (grad flags included)."""
        if self._closed:
            return self._model
        if self._trainable is not None:
            raise InputError("cannot close a History while an adapter is being trained")
        self._fused.remove()
        if self._peft is not None:
            self._peft.unload()
            self._peft = None
        self._layer_cache = None
        self._restore_grads()
        self._rounds.clear()
        self._closed = True
        return self._model

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
