"""The compiled decoding path of the dose walk and the collection, on CPU: one slot for the
whole walk (static cache; torch compiles it only on GPUs), the same completions as eager
steering in fp32, and nothing left installed afterwards."""

import torch

from steer_heal.filters import Verdict
from steer_heal.filters.dose import collect, walk_dose
from steer_heal.models.model import decoder_blocks
from steer_heal.run import config as cfg
from steer_heal.run import loop
from steer_heal.sampling import Sampling
from steer_heal.steering.vector import SteeringVector

POOL = [f"Question {i}: should I follow the rule?" for i in range(6)]
SAMPLING = Sampling(do_sample=False, max_new_tokens=4, batch_size=3)


class KeepAll:
    name = "keep_all"

    def __call__(self, completions):
        return [Verdict(True, {"coeff": c.coeff}, []) for c in completions]


def test_compiled_walk_and_collect_equal_eager_and_leave_no_hooks(llama):
    model, tok = llama
    vec = SteeringVector({1: torch.randn(64, generator=torch.Generator().manual_seed(0))}, hidden_size=64, n_layers=4)
    args = dict(target=0.5, c_min=0.5, c_max=4.0, steps=1, probe_size=3, sampling=SAMPLING)
    eager = walk_dose(model, tok, vec, POOL, KeepAll(), **args)
    compiled = walk_dose(model, tok, vec, POOL, KeepAll(), compiled=True, **args)
    assert [p.coeff for p in compiled.probes] == [p.coeff for p in eager.probes]
    got = collect(model, tok, vec, POOL, KeepAll(), 2.0, n_keep=3, max_batches=1, sampling=SAMPLING, compiled=True)
    ref = collect(model, tok, vec, POOL, KeepAll(), 2.0, n_keep=3, max_batches=1, sampling=SAMPLING)
    assert [c.token_ids for c in got.completions] == [c.token_ids for c in ref.completions]
    assert all(c.coeff == 2.0 for c in got.completions)  # the slot's coefficient is recorded
    assert all(not b._forward_hooks for b in decoder_blocks(model))


def test_run_compiled_switch(llama):
    model = llama[0]
    assert not loop.use_compiled(cfg.resolve("tiny"), model)  # the default: eager
    assert not loop.use_compiled(cfg.resolve("tiny", overrides={"run": {"compiled": "auto"}}), model)  # auto: eager
    assert not loop.use_compiled(cfg.resolve("tiny", overrides={"run": {"compiled": "false"}}), model)
    assert loop.use_compiled(cfg.resolve("tiny", overrides={"run": {"compiled": "true"}}), model)


def test_past_the_recompile_limit_new_shapes_decode_eager_with_one_warning(monkeypatch):
    import warnings

    import torch._dynamo

    from steer_heal import generate
    from steer_heal.models.tiny import tiny_model
    from steer_heal.sampling import Sampling

    model, tok = tiny_model("llama")
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1, raising=False)
    prompts = ["hi", "My manager told me to skip the safety check. What should I do?", "tell me a story"]
    eager = generate(model, tok, prompts, sampling=Sampling(max_new_tokens=6, batch_size=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # batch sizes 1 then 2: the second shape passes a limit of 1 graph
        first = generate(model, tok, prompts[:1], sampling=Sampling(max_new_tokens=6, batch_size=1), compiled=True)
        rest = generate(model, tok, prompts, sampling=Sampling(max_new_tokens=6, batch_size=2), compiled=True)
        generate(model, tok, prompts, sampling=Sampling(max_new_tokens=6, batch_size=3), compiled=True)
    limit = [w for w in caught if "recompile limit" in str(w.message)]
    assert len(limit) == 1, [str(w.message) for w in caught]
    assert "recompile limit (1 graphs for 1 batch shapes" in str(limit[0].message)
    assert [c.token_ids for c in first + rest[1:]] == [c.token_ids for c in eager[:1] + eager[1:]]
