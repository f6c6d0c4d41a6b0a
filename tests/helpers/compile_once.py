"""One process that compiles a tiny model's forward through the steer-heal compile cache and
prints, as JSON, the inductor cache counters, the logits and the folder used
(tests/test_compile_cache.py runs it several times against one STEER_HEAL_CACHE)."""

import json
import warnings

import torch
from torch._dynamo.utils import counters

from steer_heal.models.compile_cache import use_compile_cache
from steer_heal.models.tiny import tiny_model

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    folder = use_compile_cache()
model, _ = tiny_model("llama")
ids = torch.arange(2 * 16).reshape(2, 16) % 100
with torch.no_grad():
    eager = model(input_ids=ids).logits
    compiled = torch.compile(model)(input_ids=ids).logits
print(
    json.dumps(
        {
            "folder": str(folder),
            "hits": counters["inductor"]["fxgraph_cache_hit"],
            "misses": counters["inductor"]["fxgraph_cache_miss"],
            "warnings": [str(w.message) for w in caught],
            "compiled": compiled.flatten().tolist(),
            "eager": eager.flatten().tolist(),
        }
    )
)
