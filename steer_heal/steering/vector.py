"""SteeringVector: one direction per decoder layer, added to the residual stream.

Steering at layer l with coefficient c replaces the block output `h_l` by `h_l + c * v_l`
at every position. Two ways to run it, numerically equal:

- `apply` registers forward hooks on the blocks (cheap to switch, works for every family);
- `bake` adds `c * v_l` to the bias of the linear that writes the MLP output into the
  residual stream (`down_proj`, GPT-2's `c_proj`, NeoX's `dense_4h_to_h`), so no hook runs.
  Since `h_l = h_mid + W x + b`, adding to `b` adds to `h_l` exactly. Gemma2/3 normalise the
  MLP output before the add, so no bias reproduces the shift: bake refuses them.

Both are context managers that restore the model bit for bit on every exit path. Vectors
are not normalised: coefficient 1.0 is the persona's natural shift.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .._version import __version__
from ..errors import FileFormatError, InputError, MissingFile, ModelMismatch
from ..io import read_safetensors, save_safetensors
from ..models.loading import config_shape, expected_model_id, model_config
from ..models.model import (
    Depth,
    LayerSpec,
    block_param,
    decoder_blocks,
    hidden_size,
    model_id,
    n_layers,
    placement,
    residual_writer,
    unwrap,
)
from ..vocab import Number
from .extract import mean_difference
from .hooks import BAKED_ATTR, AddDelta, Baked, check_coeff, finite_delta, per_row_coeffs, steer
from .operators import Operated, check_operator, operator_hook
from .pairs import ContrastPair, pair_directions
from .positions import Positioned, PositionTracker, check_positions

__all__ = ["SteeringVector", "block_param", "check_coeff", "placement", "steer"]

FORMAT = "steer_heal.vector/1"


@dataclass(frozen=True)
class SteeringVector:
    """Per-layer directions `{layer: v_l}` (fp32, CPU) plus where they came from."""

    directions: dict[int, Float[Tensor, " hidden"]]
    hidden_size: int
    n_layers: int
    model_id: str = "unknown"
    method: str = "mean_diff"
    pos: str = ""
    neg: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.directions:
            raise InputError("a steering vector needs at least one layer")
        clean = {}
        for layer, v in sorted(self.directions.items()):
            if not 0 <= int(layer) < self.n_layers:
                raise InputError(f"layer {layer} out of range for {self.n_layers} layers")
            v = torch.as_tensor(v).detach().to("cpu", torch.float32).reshape(-1)
            if v.numel() != self.hidden_size:
                raise InputError(
                    f"layer {layer} direction has size {v.numel()}, expected hidden size {self.hidden_size}"
                )
            if not torch.isfinite(v).all():
                raise InputError(f"layer {layer} direction has non-finite values (NaN/inf); re-extract the vector")
            clean[int(layer)] = v
        object.__setattr__(self, "directions", clean)

    @classmethod
    def from_persona_pair(
        cls,
        model: nn.Module,
        tok,
        pos: str,
        neg: str,
        contexts: Sequence[str],
        layers: LayerSpec = Depth(0.45, 0.55),
        batch_size: int = 8,
        progress: bool = False,
    ) -> SteeringVector:
        """The mean-difference vector of a persona pair (the math is in `steer_heal.steering.extract`)."""
        directions = mean_difference(
            model, tok, pos, neg, contexts, layers=layers, batch_size=batch_size, progress=progress
        )
        return cls(
            directions=directions,
            hidden_size=hidden_size(model),
            n_layers=n_layers(model),
            model_id=model_id(model),
            method="mean_diff",
            pos=pos,
            neg=neg,
            # the HF model type (e.g. "llama"): what llama.cpp's control-vector loader reads as the model hint
            extra={
                "n_contexts": str(len(contexts)),
                "model_type": str(getattr(unwrap(model).config, "model_type", "")),
            },
        )

    @classmethod
    def from_pairs(
        cls,
        model: nn.Module,
        tok,
        pairs: Sequence[ContrastPair],
        layers: LayerSpec = Depth(0.45, 0.55),
        read: str = "last",
        method: str = "mean_diff",
        batch_size: int = 8,
        progress: bool = False,
    ) -> SteeringVector:
        """A vector from contrastive text pairs (CAA, repeng or your own): where to read the
        activation (`read`: last token or the answer's mean) and how (`method`: mean
        difference or repeng's PCA of the differences) are in `steer_heal.steering.pairs`."""
        directions = pair_directions(model, tok, pairs, layers, read, method, batch_size, progress)
        return cls(
            directions=directions,
            hidden_size=hidden_size(model),
            n_layers=n_layers(model),
            model_id=model_id(model),
            method=method if read == "last" else f"{method}/{read}",
            extra={"n_pairs": str(len(pairs)), "model_type": str(getattr(unwrap(model).config, "model_type", ""))},
        )

    # ------------------------------------------------------------ algebra

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.directions)

    def norms(self) -> dict[int, float]:
        return {layer: float(v.norm()) for layer, v in self.directions.items()}

    def _combine(self, other: SteeringVector, sign: float) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.hidden_size != self.hidden_size:
            raise InputError(f"cannot combine vectors of hidden size {self.hidden_size} and {other.hidden_size}")
        out = {layer: v.clone() for layer, v in self.directions.items()}
        for layer, v in other.directions.items():
            out[layer] = out[layer] + sign * v if layer in out else sign * v
        return replace(self, directions=out, n_layers=max(self.n_layers, other.n_layers), method="combined")

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0)

    def __mul__(self, scale: Number) -> SteeringVector:
        scale = check_coeff(scale)
        return replace(self, directions={layer: v * scale for layer, v in self.directions.items()})

    __rmul__ = __mul__

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def cosine(self, other: SteeringVector) -> float:
        """Cosine of the two vectors concatenated over their shared layers."""
        shared = [layer for layer in self.layers if layer in other.directions]
        if not shared:
            raise InputError(f"no shared layers between {self.layers} and {other.layers}")
        a = torch.cat([self.directions[layer] for layer in shared]).double()
        b = torch.cat([other.directions[layer] for layer in shared]).double()
        return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))

    # ------------------------------------------------------------ running it

    def check_compatible(self, model: nn.Module, allow_other_model: bool = False) -> None:
        """Refuse a model of another shape, or (unless `allow_other_model`) another model id."""
        self.check_shape(hidden_size(model), n_layers(model), model_id(model), allow_other_model)

    def check_shape(self, size: int, depth: int, other: str = "unknown", allow_other_model: bool = False) -> None:
        """`check_compatible` from a model's numbers alone (e.g. its config, before loading weights).

        Two models of one shape (a base and its fine-tune, two sizes of a family sharing a
        width) take each other's vectors without an error in the numbers, so the id is the
        only guard; a vector or model without an id ("unknown") is not compared.
        """
        known = {"", "unknown"}
        if not allow_other_model and self.model_id not in known and other not in known and other != self.model_id:
            raise ModelMismatch(
                f"vector was made on model {self.model_id!r} but this model is {other!r}; extract a vector on this "
                "model, or pass allow_other_model=True (--allow-other-model) if they share a residual stream"
            )
        if size != self.hidden_size:
            raise ModelMismatch(
                f"vector was made for hidden size {self.hidden_size} (model {self.model_id!r}) but this model "
                f"has hidden size {size}; extract a vector on this model"
            )
        if max(self.layers) >= depth:
            raise ModelMismatch(
                f"vector uses layer {max(self.layers)} (made on a {self.n_layers}-layer model {self.model_id!r}) "
                f"but this model has {depth} layers; extract a vector on this model"
            )

    def using(self, operator: str = "add", positions: Any = "all") -> Operated:
        """This vector applied with another operator (`steering.operators`: add, ablate, norm_add)
        or at some positions only (`steering.positions`), wherever a `Steering` goes
        (`generate(steering=vec.using(positions="generated"))`)."""
        return Operated(self, operator, positions)

    @contextmanager
    def apply(
        self,
        model: nn.Module,
        coeff: Number | Sequence[Number] = 1.0,
        allow_other_model: bool = False,
        operator: str = "add",
        positions: Any = "all",
    ) -> Iterator[nn.Module]:
        """Forward hooks adding `coeff * v_l` to block l's output at every position; or, with
        `operator` "ablate" or "norm_add", the other operators of `steer_heal.steering.operators`;
        `positions` ("all", "prompt", "generated" or a slice of token indices) restricts the
        change to those tokens (`steer_heal.steering.positions`).

        A sequence of coefficients steers each row of the batch at its own strength: row i
        gets `coeff[i] * v_l`, so one forward serves several doses (the speculative dose walk
        uses this). The batch must then have exactly `len(coeff)` rows; any other batch
        fails to broadcast rather than steering the wrong rows."""
        rows = per_row_coeffs(coeff)
        tracker = None if check_positions(positions) == "all" else PositionTracker()
        if check_operator(operator) != "add" and rows is not None:
            raise InputError(f"per-row coefficients are for the add operator only, not {operator}")
        if rows is None:
            scale = mark = check_coeff(coeff)
        else:  # (rows, 1, 1) x v: broadcasts over positions, not over other batch sizes (directions are fp32)
            scale = torch.tensor(rows, dtype=torch.float32)[:, None, None]
            mark = rows[0] if len(set(rows)) == 1 else math.nan
        self.check_compatible(model, allow_other_model)
        blocks = decoder_blocks(model)
        with ExitStack() as stack:
            if tracker is not None:  # numbers the tokens of every call, for the positional hooks
                stack.callback(model.register_forward_pre_hook(tracker, with_kwargs=True).remove)
            for layer, v in self.directions.items():
                device, dtype = placement(blocks[layer])  # each layer's delta lives on that layer's device
                delta = finite_delta((scale * v).to(device=device, dtype=dtype), coeff, layer)
                if operator == "add":
                    hook = AddDelta(delta, mark, "hooks")
                else:
                    hook = operator_hook(operator, v.to(device), mark)
                if tracker is not None:
                    hook = Positioned(hook, positions, tracker)
                stack.callback(blocks[layer].register_forward_hook(hook).remove)
            yield model

    @contextmanager
    def bake(self, model: nn.Module, coeff: Number = 1.0, allow_other_model: bool = False) -> Iterator[nn.Module]:
        """Fold `coeff * v_l` into the residual writer's bias; restored exactly on exit."""
        coeff = check_coeff(coeff)
        self.check_compatible(model, allow_other_model)
        writers = [(residual_writer(model, layer), v) for layer, v in self.directions.items()]
        with ExitStack() as stack:
            for (linear, v), layer in zip(writers, self.directions):
                if linear.weight.device.type == "meta":
                    raise InputError(
                        f"bake cannot fold into layer {layer}: its weights are offloaded (on 'meta' until the "
                        "forward); use apply(), or load the model without disk/CPU offload"
                    )
                delta = finite_delta(
                    (coeff * v).to(device=linear.weight.device, dtype=linear.weight.dtype), coeff, layer
                )
                bias = linear.bias
                if bias is not None and not bool(torch.isfinite(bias + delta).all()):
                    raise InputError(
                        f"coeff {coeff} overflows layer {layer}'s bias in {bias.dtype}; use a smaller coeff"
                    )
                stack.callback(_add_bias(linear, delta, coeff))
            yield model

    # ------------------------------------------------------------ files

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "model_id": self.model_id,
            "hidden_size": str(self.hidden_size),
            "n_layers": str(self.n_layers),
            "layers": json.dumps(list(self.layers)),
            "method": self.method,
            "pos": self.pos,
            "neg": self.neg,
            "version": __version__,
            "extra": json.dumps(self.extra),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write safetensors atomically (`steer_heal.io`) with the provenance in metadata."""
        tensors = {f"layer.{layer}": v.contiguous() for layer, v in self.directions.items()}
        return save_safetensors(path, tensors, self.metadata())

    @classmethod
    def load_for(
        cls,
        path: str | os.PathLike,
        model_name: str | None = None,
        allow_other_model: bool = False,
        blocks: str | None = None,
        writer: str | None = None,
    ) -> tuple[SteeringVector, str]:
        """Load a vector and check it against the model it will steer (default: the one it
        was made on) from that model's config alone, before any weights are loaded.
        Returns the vector and the model name to load."""
        vec = cls.load(path)
        name = model_name or vec.model_id
        if name in ("", "unknown"):
            raise InputError(f"{path} does not say which model it was made on; pass --model")
        size, depth = config_shape(model_config(name, blocks=blocks, writer=writer))
        vec.check_shape(size, depth, expected_model_id(name), allow_other_model)
        return vec, name

    def to_gguf(self, path: str | os.PathLike, coeff: Number = 1.0, model_hint: str = "") -> Path:
        """Write a llama.cpp control vector (`steer_heal.steering.controlvector`): `direction.<layer>`
        = `coeff * v_layer`, so llama.cpp's strength 1.0 is our coefficient `coeff`."""
        from .controlvector import write_control_vector

        coeff = check_coeff(coeff)
        provenance = {k: v for k, v in self.metadata().items() if k != "format"}
        hint = model_hint or self.extra.get("model_type") or self.model_id  # the model type where we know it
        return write_control_vector(path, self.directions, hint, provenance, coeff)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, model: nn.Module | None = None) -> SteeringVector:
        """Read a llama.cpp control vector (ours: bit for bit; another writer's: its
        directions, checked against `model`'s width and depth when given)."""
        from .controlvector import check_against, read_control_vector

        directions, provenance, coeff = read_control_vector(path)
        width = next(iter(directions.values())).numel()
        depth = max(directions)
        if model is not None:
            check_against(path, width, depth, hidden_size(model), n_layers(model))
        layers = int(provenance.get("n_layers") or (n_layers(model) if model is not None else depth + 1))
        if depth >= layers:
            raise ModelMismatch(f"{path}: control vector reaches layer {depth} but its model has {layers} layers")
        extra = json.loads(provenance.get("extra") or "{}")
        if coeff != 1.0:
            extra["gguf_coeff"] = repr(coeff)  # the file holds coeff * v
        return cls(
            directions,
            width,
            layers,
            provenance.get("model_id") or (model_id(model) if model is not None else "unknown"),
            provenance.get("method", "gguf"),
            provenance.get("pos", ""),
            provenance.get("neg", ""),
            extra,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVector:
        path = Path(path)
        if not path.exists():
            raise MissingFile(f"no vector file at {path}")
        meta, tensors = read_safetensors(path, "vector")
        if meta.get("format") != FORMAT:
            raise FileFormatError(
                f"{path} is not a steer_heal vector (metadata format {meta.get('format')!r}, expected {FORMAT!r})"
            )
        try:
            layers = json.loads(meta["layers"])
            directions = {int(layer): tensors[f"layer.{layer}"] for layer in layers}
            return cls(
                directions=directions,
                hidden_size=int(meta["hidden_size"]),
                n_layers=int(meta["n_layers"]),
                model_id=meta.get("model_id", "unknown"),
                method=meta.get("method", "mean_diff"),
                pos=meta.get("pos", ""),
                neg=meta.get("neg", ""),
                extra=json.loads(meta.get("extra", "{}")),
            )
        except (KeyError, json.JSONDecodeError) as exc:
            raise FileFormatError(f"{path} has incomplete vector metadata (missing {exc}); re-save it") from None
        except ValueError as exc:  # the directions themselves (NaN, wrong size, layer out of range)
            raise FileFormatError(f"{path}: {exc}") from None


def _add_bias(linear: nn.Module, delta: Tensor, coeff: float):
    """Add `delta` to `linear`'s bias (creating a zero bias if absent) and tag the linear
    as baked (`steer_heal.steering.hooks`); return the undo."""
    old = linear.bias
    tags = getattr(linear, BAKED_ATTR, ())
    setattr(linear, BAKED_ATTR, (*tags, Baked(coeff)))

    def untag() -> None:
        if tags:
            setattr(linear, BAKED_ATTR, tags)
        else:
            delattr(linear, BAKED_ATTR)

    if old is None:
        linear.bias = nn.Parameter(delta.clone(), requires_grad=False)

        def undo() -> None:
            linear.bias = None
            untag()

        return undo
    saved = old.detach().clone()
    with torch.no_grad():
        old.add_(delta)

    def restore() -> None:
        with torch.no_grad():
            old.copy_(saved)
        untag()

    return restore
