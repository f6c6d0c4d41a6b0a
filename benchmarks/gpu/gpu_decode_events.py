"""Settle the open cells of docs/benchmarks.md: the cost of steering in compiled decoding,
timed with CUDA events, many repeats, variants interleaved.

    PYTHONPATH=. python benchmarks/gpu/gpu_decode_events.py [--shape 0.5b] [--repeats 12] [--new 64]

Random-weight Qwen2 0.5B shape, bfloat16, static-cache compiled decoding (transformers
compiles the decode step). Variants: unsteered; hooks on a 3-layer band through one
`SteeringSlot` (how the loop steers compiled); the same band baked into the biases. For each
batch size, each variant is warmed up (compiled) first; then every repeat runs the three
variants in a rotating order, each `generate` call timed by CUDA events on the current
stream. Ratios are paired: each repeat's steered tok/s over the same repeat's unsteered,
so drift of the card between repeats cancels. Prints the median, the quartiles and the
min-max of the paired ratios, and how many graphs were compiled during the timed repeats
(0 means no repeat paid for a compile).

"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch._dynamo

from steer_heal import generate
from steer_heal.data import load_contexts
from steer_heal.models.model import n_layers, resolve_layers
from steer_heal.models.tiny import tiny_tokenizer
from steer_heal.sampling import Sampling
from steer_heal.steering.generation import compiled_graphs
from steer_heal.steering.slot import SteeringSlot

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_throughput import build, random_vector  # noqa: E402


def timed(model, tok, prompts, new: int, batch: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = generate(
        model, tok, prompts, compiled=True, progress=False, sampling=Sampling(max_new_tokens=new, batch_size=batch)
    )
    end.record()
    end.synchronize()
    tokens = sum(len(c.token_ids) + (c.finish_reason == "stop") for c in out)
    return tokens / (start.elapsed_time(end) / 1000)


@contextmanager
def slot_on(model, layers, vec):
    with SteeringSlot(model, layers) as slot:
        slot.set(vec, 1.0)
        yield


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def write(out: Path, result: dict, rows: list[str], args) -> None:
    """The table so far (written after every batch size, so a cut-short run still leaves its cells)."""
    table = "\n".join(
        [
            f"{result['card']}, {args.shape} shape, bf16, compiled (static cache), {args.new} new tokens, "
            f"{args.repeats} interleaved repeats, CUDA events",
            "",
            "| batch | variant | tok/s median [min, max] | x unsteered (paired median) | quartiles | min-max | graphs while timing |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_events.json").write_text(json.dumps(result, indent=1))
    (out / "decode_events.md").write_text(table + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5b")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default="out/decode_events")
    args = ap.parse_args()
    # 3 variants x 3 batch sizes: more graphs than torch's default limit of 8
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    model, tok = build(args.shape), tiny_tokenizer()
    band = resolve_layers((0.45, 0.55), n_layers(model))[:3]
    vec = random_vector(model, band)
    variants = {
        "unsteered": nullcontext,
        "hooks band (slot)": lambda: slot_on(model, band, vec),
        "bias band (baked)": lambda: vec.bake(model, 1.0),
    }
    names = list(variants)
    rows, result = [], {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "cells": []}
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = load_contexts()[:batch]
        for name in names:  # warm-up: compile each variant's graph for this shape
            with variants[name]():
                timed(model, tok, prompts, args.new, batch)
                timed(model, tok, prompts, args.new, batch)
        graphs = compiled_graphs()
        speeds = {name: [] for name in names}
        for r in range(args.repeats):
            for name in names[r % 3 :] + names[: r % 3]:
                with variants[name]():
                    speeds[name].append(timed(model, tok, prompts, args.new, batch))
        new_graphs = compiled_graphs() - graphs
        for name in names:
            ratios = [s / u for s, u in zip(speeds[name], speeds["unsteered"])]
            q1, med, q3 = quartiles(ratios)
            cell = {
                "batch": batch,
                "variant": name,
                "tok_s_median": statistics.median(speeds[name]),
                "tok_s_min": min(speeds[name]),
                "tok_s_max": max(speeds[name]),
                "ratio_median": med,
                "ratio_q1": q1,
                "ratio_q3": q3,
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "graphs_during_timing": new_graphs,
            }
            result["cells"].append(cell)
            rows.append(
                f"| {batch} | {name} | {cell['tok_s_median']:.0f} [{cell['tok_s_min']:.0f}, {cell['tok_s_max']:.0f}] | "
                f"{med:.3f} | [{q1:.3f}, {q3:.3f}] | [{min(ratios):.3f}, {max(ratios):.3f}] | {new_graphs} |"
            )
            print(rows[-1], flush=True)
        write(Path(args.out), result, rows, args)


if __name__ == "__main__":
    main()
