"""Steering: a vector per layer, extracted from contrastive prompts, added to the residual stream
by hooks, a reusable slot or folded biases, and batched generation with it on.

- `vector`: `SteeringVector` (apply, bake, arithmetic, save and load, llama.cpp export);
- `extract`: the mean difference of block outputs between two personas over shared contexts;
- `hooks`: the one place that knows what steering is active on a model (`steer`, per-row coefficients);
- `slot`: `SteeringSlot`, hooks installed once whose vector and coefficient change per call;
- `controlvector`: the llama.cpp control-vector GGUF;
- `generation`: `generate`, left-padded batched (optionally compiled) decoding -> `Completion`s;
- `graphs`: eager decoding that replays one captured CUDA graph per batch (`Sampling.cuda_graphs`).
"""

from .controlvector import read_control_vector, write_control_vector
from .extract import last_token_states, mean_difference
from .generation import Completion, generate
from .hooks import Steering, active_steering, steer
from .slot import SteeringSlot
from .vector import SteeringVector

__all__ = [
    "Completion",
    "Steering",
    "SteeringSlot",
    "SteeringVector",
    "active_steering",
    "generate",
    "last_token_states",
    "mean_difference",
    "read_control_vector",
    "steer",
    "write_control_vector",
]
