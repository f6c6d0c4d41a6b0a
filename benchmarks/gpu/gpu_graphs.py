"""Eager decoding with and without CUDA graphs (`Sampling.cuda_graphs`, `steering.graphs`), one GPU.

    PYTHONPATH=. python benchmarks/gpu/gpu_graphs.py [--shapes smollm2,4b] [--repeats 3] [--out FILE]

Random-weight models of real shapes in bfloat16 (speed does not depend on weight values;
random text rarely stops, so every row decodes all 96 tokens), the tiny chatml tokenizer,
the loop's two decoding workloads through `generate` itself: collect (64 prompts, one
batch of 64, sampled, one coefficient) and the speculative dose walk's batch (136 rows,
sampled, a coefficient per row). Arms alternate in one process (eager, graphs, eager,
graphs, ...) after one untimed call of each; seconds are the median over repeats, with the
capture counted in (one per batch: the graphed arm pays its capture every call, as the loop
does). Also reported: whether the two arms drew the same tokens (bf16, so rounding may
separate them; equality is tested in float32 by tests/test_graphs.py).

Rule, written before the first run (2026-12-07): `generate.cuda_graphs` becomes on by
default (the config's [generate] and `Sampling`) only if tests/test_graphs.py passes on the
GPU, the graphed/eager median ratio is below 0.7 for both workloads at both shapes, and the
SmolLM2-shape loop round (`gpu_round_4b.py --shape smollm2 --cuda-graphs` against without,
one process each, side by side on one machine) is below 0.95 of eager. Otherwise it stays
off by default and opt-in.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from steer_heal import SteeringVector, generate
from steer_heal.models.model import hidden_size, n_layers
from steer_heal.models.tiny import tiny_tokenizer
from steer_heal.sampling import Sampling
from steer_heal.steering.graphs import GraphedDecode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_round_4b import random_model  # noqa: E402

NEW = 96


def workloads(model) -> dict:
    g = torch.Generator().manual_seed(0)
    size, depth = hidden_size(model), n_layers(model)
    layers = (depth // 2 - 1, depth // 2)
    vec = SteeringVector({k: 0.5 * torch.randn(size, generator=g) for k in layers}, size, depth)
    prompts = [f"Question {i}: my manager told me to skip the check. What should I do?" for i in range(136)]
    return {
        "collect_64": dict(prompts=prompts[:64], steering=vec, coeff=2.0, batch=64),
        "walk_136": dict(prompts=prompts, steering=vec, coeff=[0.25 + 0.05 * i for i in range(136)], batch=136),
    }


def timed(model, tok, work: dict, graphs: bool) -> tuple[float, list]:
    sampling = Sampling(max_new_tokens=NEW, do_sample=True, batch_size=work["batch"], cuda_graphs=graphs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate(
        model, tok, work["prompts"], steering=work["steering"], coeff=work["coeff"], sampling=sampling, seed=7
    )
    torch.cuda.synchronize()
    return time.perf_counter() - t0, [c.token_ids for c in out]


COUNTS: list[dict] = []  # each graphed batch's eager / captured / replayed steps, read as it closes
_close = GraphedDecode.close


def _counting_close(self: GraphedDecode) -> None:
    COUNTS.append(dict(self.counts))
    _close(self)


GraphedDecode.close = _counting_close  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2,4b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tok = tiny_tokenizer("chatml")
    rows = []
    for shape in args.shapes.split(","):
        model = random_model(shape, "cuda", torch.bfloat16)
        for name, work in workloads(model).items():
            seconds = {False: [], True: []}
            for graphs in (False, True):  # untimed: first-call costs (kernels, allocator) paid once per arm
                timed(model, tok, work, graphs)
            same = None
            COUNTS.clear()
            for _ in range(args.repeats):
                tokens = {}
                for graphs in (False, True):
                    s, tokens[graphs] = timed(model, tok, work, graphs)
                    seconds[graphs].append(s)
                same = tokens[False] == tokens[True]
            generated = len(work["prompts"]) * NEW
            eager, graphed = statistics.median(seconds[False]), statistics.median(seconds[True])
            row = {
                "shape": shape,
                "workload": name,
                "eager_s": seconds[False],
                "graphs_s": seconds[True],
                "eager_tok_s": generated / eager,
                "graphs_tok_s": generated / graphed,
                "ratio": graphed / eager,
                "same_tokens_bf16": same,
                "graph_steps_per_batch": COUNTS[-1] if COUNTS else None,  # eager / captured / replayed
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    import transformers

    summary["transformers"] = transformers.__version__
    print("| shape | workload | eager s | graphs s | eager tok/s | graphs tok/s | graphs / eager |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['workload']} | {statistics.median(r['eager_s']):.2f} | "
            f"{statistics.median(r['graphs_s']):.2f} | {r['eager_tok_s']:,.0f} | {r['graphs_tok_s']:,.0f} | "
            f"{r['ratio']:.2f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
