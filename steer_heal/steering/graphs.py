"""Eager decoding with CUDA graphs: one decode step captured per batch, replayed for every token.

At the sizes our users run, an eager decode step is bound by the host: the model's Python
(transformers' modelling code, hooks, peft) costs about 40 ms a forward for a 30-layer
model whatever the batch, while the GPU's share is a few ms (docs/benchmarks.md). Over a
static KV cache every decode step has the same shapes and writes in place, and
transformers builds the mask at the cache's full length, so one step can be recorded as a
CUDA graph and replayed: the GPU runs the same kernels, the host runs none of the Python.
No compiler is involved, so there is nothing to compile or keep between processes, and a
new student after a fold costs one capture, not a new graph to trace.

`decode_graphs(model)` puts a `GraphedDecode` in place of the model's `forward` while one
batch decodes and restores it on every exit path:

- a call that is not a one-token step over a `StaticCache` (the prefill, anything else)
  runs the real forward;
- the first decode step runs the real forward on a side stream (lazily made buffers and
  library workspaces come into being outside the capture, as capture requires);
- the second step's tensors are copied into static buffers, the step is captured on them
  and replayed, and every later step copies its tensors into those buffers and replays;
- a step whose keywords, shapes, dtypes or other values differ from the captured one's
  runs the real forward: a graph is never replayed for inputs it was not made for.

What the graph records is what ran at capture: the steering hooks and their coefficients
(per row too), the LoRA view, the weights. So a graph lives for one batch (made inside the
batch's steering and view, dropped when the batch ends) and nothing it read can change
while it replays. What keeps Python state per call cannot be recorded: positional steering
(it numbers each call's tokens) and transformers' sliding-window cache layers (their length
is a Python int, read for positions and masks; Gemma 2 and 3), nor can a model spread over
devices; `graphable` and `replayable` refuse them, with a warning, and those batches decode
as before. A capture that fails for any other reason (an op that reads a tensor's value on
the host) warns once and the batch goes on eagerly.

Token selection stays in transformers' loop, outside the graph and on the batch's seeded
generator, so a graphed batch draws what the eager static-cache batch draws whenever their
logits agree (`tests/test_graphs.py` on CPU with replay emulated; the CUDA test against
eager decoding in float32).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..models.architecture import text_config, unwrap
from .positions import Positioned

CACHE_KEYS = ("cache", "past_key_values")  # the cache's keyword: transformers 5.2x renamed it


def _static_cache(kwargs: dict) -> Any:
    from transformers.cache_utils import StaticCache

    for key in CACHE_KEYS:
        if isinstance(kwargs.get(key), StaticCache):
            return kwargs[key]
    return None


def replayable(cache: Any) -> bool:
    """Whether a static cache keeps all its state in tensors. Only transformers' plain
    `StaticLayer` does (its length is a tensor the graph advances); a sliding-window layer
    keeps its length as a Python int, read for positions and masks, which a replayed graph
    would leave where the capture found it: silently wrong positions, so never replayed."""
    from transformers.cache_utils import StaticLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is StaticLayer for layer in layers)


def is_decode_step(args: tuple, kwargs: dict) -> bool:
    """A one-token step over a static cache, passed by keyword (what `generate` makes)."""
    ids = kwargs.get("input_ids")
    return (
        not args
        and isinstance(ids, Tensor)
        and ids.dim() == 2
        and ids.shape[1] == 1
        and kwargs.get("inputs_embeds") is None
        and _static_cache(kwargs) is not None
    )


def _describe(value: Any) -> tuple:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", type(value), value)
    if isinstance(value, dict):  # a mask per attention type (models with sliding-window layers)
        return ("mapping", tuple((key, _describe(value[key])) for key in sorted(value)))
    return ("object", id(value))


def _signature(kwargs: dict) -> tuple:
    """What a captured step depends on besides its tensors' values: each keyword's shape,
    dtype and device, or the object itself (the cache) or its value (flags, counts), and
    the same for each entry of a keyword that is a dict (a mask per attention type)."""
    return tuple((key, _describe(kwargs[key])) for key in sorted(kwargs))


def _tensors(kwargs: dict) -> dict[tuple[str, ...], Tensor]:
    """Every tensor of a step's keywords, by its path: (keyword,) or (keyword, dict key)."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, Tensor):
            out[(key,)] = value
        elif isinstance(value, dict):
            out.update({(key, sub): v for sub, v in value.items() if isinstance(v, Tensor)})
    return out


def _with(kwargs: dict, tensors: dict[tuple[str, ...], Tensor]) -> dict:
    """`kwargs` with the tensors at these paths put in (dicts copied, not written into)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
    for path, tensor in tensors.items():
        if len(path) == 1:
            out[path[0]] = tensor
        else:
            out[path[0]][path[1]] = tensor
    return out


def graphable(model: nn.Module) -> str | None:
    """Why this model's decode steps cannot be captured, or None when they can."""
    inner = unwrap(model)
    for module in inner.modules():
        if any(isinstance(hook, Positioned) for hook in module._forward_hooks.values()):
            return "positional steering numbers each call's tokens on the host"
    if inner._forward_pre_hooks or inner._forward_hooks:
        return "it has forward hooks of its own, which run outside the recorded step"
    kinds = set(getattr(text_config(inner.config), "layer_types", None) or ())
    if kinds - {"full_attention"}:
        return (
            f"its {', '.join(sorted(kinds - {'full_attention'}))} layers keep their cache length on the host, "
            "where a replayed graph would freeze it"
        )
    devices = {p.device for p in inner.parameters()} | {b.device for b in inner.buffers()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return f"its weights are on {', '.join(sorted(str(d) for d in devices))}, not all on one CUDA device"
    if len({str(d) for d in (getattr(inner, "hf_device_map", None) or {}).values()}) > 1:
        return "it is split over devices (device_map)"
    return None


class GraphedDecode:
    """The model's forward while one batch decodes (the module docstring).

    `capture=False` keeps the bookkeeping (static buffers, signature, one output object
    rewritten in place) but replays by running the forward on the static buffers: the CPU
    tests check with it that transformers' loop is indifferent to being served that way.
    """

    def __init__(self, forward: Callable, device: torch.device, capture: bool = True) -> None:
        self.forward, self.device, self.capture = forward, device, capture
        # transformers reads the forward's parameters (does it take position_ids, an attention
        # mask?) to decide what to pass: it must see the model's, not (*args, **kwargs)
        self.__signature__ = inspect.signature(forward)
        self.signature: tuple | None = None
        self.static: dict[tuple[str, ...], Tensor] = {}
        self.output: Any = None
        self.call: dict = {}
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.counts = {"eager": 0, "captured": 0, "replayed": 0}

    def __call__(self, *args, **kwargs):
        if self.failed or not is_decode_step(args, kwargs):
            return self._eager(args, kwargs)
        if not replayable(_static_cache(kwargs)):
            self.failed = True
            warnings.warn(
                "decoding without CUDA graphs: this static cache keeps state on the host (a sliding-window "
                "layer's length), which a replayed graph would freeze",
                RuntimeWarning,
                stacklevel=3,
            )
            return self._eager(args, kwargs)
        signature = _signature(kwargs)
        if self.signature is None:
            self.signature = signature
            return self._warm_up(kwargs)
        if signature != self.signature:
            return self._eager(args, kwargs)
        if not self.static:
            self.static = {path: v.clone() for path, v in _tensors(kwargs).items()}
            if not self._capture(kwargs):
                return self._eager(args, kwargs)
        else:
            fresh = _tensors(kwargs)
            for path, buffer in self.static.items():
                buffer.copy_(fresh[path])
        self._replay()
        return self.output

    def _eager(self, args: tuple, kwargs: dict):
        self.counts["eager"] += 1
        return self.forward(*args, **kwargs)

    def _warm_up(self, kwargs: dict):
        self.counts["eager"] += 1
        if not self.capture:
            return self.forward(**kwargs)
        here = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(here)
        with torch.cuda.stream(side):
            out = self.forward(**kwargs)
        here.wait_stream(side)
        return out

    def _capture(self, kwargs: dict) -> bool:
        call = _with(kwargs, self.static)
        if not self.capture:
            self.call = call  # replayed by running it (`_replay`)
            return True
        graph = torch.cuda.CUDAGraph()
        here = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(here)
        try:
            # capture_begin/end, not torch.cuda.graph(): that one also runs gc.collect() and
            # empty_cache() every time, a cost paid per batch here
            with torch.cuda.stream(side):
                graph.capture_begin()
                try:
                    output = self.forward(**call)
                finally:
                    graph.capture_end()
        except Exception as exc:  # an op that needs the host mid-step: this batch goes on eagerly
            here.wait_stream(side)
            self.failed = True
            warnings.warn(
                f"CUDA graph capture of a decode step failed ({type(exc).__name__}: {str(exc)[:200]}); this batch "
                "decodes eagerly. Set generate.cuda_graphs = false to stop trying",
                RuntimeWarning,
                stacklevel=4,
            )
            return False
        here.wait_stream(side)
        self.graph, self.output = graph, output
        self.counts["captured"] += 1
        return True

    def _replay(self) -> None:
        self.counts["replayed"] += 1
        if self.graph is not None:
            self.graph.replay()
            return
        fresh = self.forward(**self.call)  # emulated: the step on the static buffers, into one output
        if self.output is None:
            self.output = fresh
        else:
            self.output.logits.copy_(fresh.logits)

    def close(self) -> None:
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.output, self.static, self.call = None, None, {}, {}


@contextmanager
def decode_graphs(model: nn.Module, capture: bool = True) -> Iterator[GraphedDecode | None]:
    """Decode `model`'s batch through a `GraphedDecode` (None when `graphable` says no, and
    with `capture=True` a warning says why); the model's own forward is back on exit."""
    inner = unwrap(model)
    if capture:
        why = graphable(model)
        if why is not None:
            warnings.warn(f"decoding without CUDA graphs: {why}", RuntimeWarning, stacklevel=3)
            yield None
            return
    device = next(inner.parameters()).device
    graphed = GraphedDecode(inner.forward, device, capture)
    had_own = "forward" in inner.__dict__
    own = inner.__dict__.get("forward")
    inner.forward = graphed
    try:
        yield graphed
    finally:
        if had_own:
            inner.forward = own
        else:
            del inner.forward
        graphed.close()
