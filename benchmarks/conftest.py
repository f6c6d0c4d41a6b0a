"""Benchmark fixtures. BENCH_MODEL=tiny (default, CI) or smollm2 (the embedded model)."""

import os

import pytest
import torch

from steer_heal import SteeringVector, load_model
from steer_heal.data import load_axis, load_contexts
from steer_heal.models.model import n_layers

torch.set_num_threads(min(2, os.cpu_count() or 1))
MODEL = os.environ.get("BENCH_MODEL", "tiny")


@pytest.fixture(scope="session")
def bench_model():
    return load_model("tiny-llama" if MODEL == "tiny" else "smollm2-135m")


@pytest.fixture(scope="session")
def axis():
    return load_axis("authority")


@pytest.fixture(scope="session")
def vectors(bench_model, axis):
    """A 1-layer band vector and an all-layer vector from the same persona pair."""
    model, tok = bench_model
    contexts = load_contexts()[:16]
    band = SteeringVector.from_persona_pair(model, tok, axis.pos, axis.neg, contexts, layers=(0.5, 0.5))
    every = SteeringVector.from_persona_pair(
        model, tok, axis.pos, axis.neg, contexts, layers=list(range(n_layers(model)))
    )
    return {"1 layer": band, "all layers": every}
