"""GPU throughput of steered generation, eager vs compiled (static cache), no downloads.

Random-weight models of real shapes (speed does not depend on weight values), bf16:
variants unsteered / hooks on a 3-layer band / hooks on all layers / baked bias on the
band, each in eager decoding and in static-cache compiled decoding (transformers compiles
the decode step when `cache_implementation="static"` on a GPU). Steering under compile goes
through a `SteeringSlot`, whose buffers are rewritten in place, so a new coefficient does
not recompile; the script counts recompiles to show it, and compares with `vec.apply` and
`vec.bake` per call. Rounds are interleaved (variant order rotates each repeat); median and
spread over repeats. It also checks that compiled steered output equals eager steered
output token for token, and measures batch-32 vs one-at-a-time throughput.

    PYTHONPATH=. python benchmarks/gpu/gpu_throughput.py [--shapes 0.5b,4b] [--repeats 5] [--new 64]

Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

from steer_heal import SteeringVector, generate
from steer_heal.data import load_contexts
from steer_heal.models.model import hidden_size, n_layers, resolve_layers
from steer_heal.models.tiny import tiny_tokenizer
from steer_heal.sampling import Sampling
from steer_heal.steering.slot import SteeringSlot

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


SHAPES = {
    "0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
    ),  # CPU smoke test of this script
    "4b": dict(
        hidden_size=2560,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=9728,
        vocab_size=151936,
    ),
}


def build(shape: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **SHAPES[shape],
        max_position_embeddings=4096,
        tie_word_embeddings=shape == "0.5b",
        bos_token_id=1,
        eos_token_id=3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = 3
    return model


def random_vector(model, layers) -> SteeringVector:
    g = torch.Generator().manual_seed(1)
    return SteeringVector(
        {l: torch.randn(hidden_size(model), generator=g) for l in layers},
        hidden_size=hidden_size(model),
        n_layers=n_layers(model),
    )


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def timed_generate(model, tok, prompts, new, compiled, ctx_factory, batch):
    sync()
    start = time.perf_counter()
    with ctx_factory():
        out = generate(
            model,
            tok,
            prompts,
            compiled=compiled,
            progress=False,
            sampling=Sampling(max_new_tokens=new, batch_size=batch),
        )
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) + (c.finish_reason == "stop") for c in out)
    return tokens / seconds, out


@contextmanager
def slot_set(slot: SteeringSlot, vec: SteeringVector, coeff: float = 1.0):
    with slot:
        slot.set(vec, coeff)
        yield slot


def record(rows: list, shape: str, batch: int, mode: str, results: dict) -> None:
    base = statistics.median(results["unsteered"])
    for name, values in results.items():
        med = statistics.median(values)
        rows.append((shape, batch, mode, name, med, min(values), max(values), med / base))
        print(
            f"{shape} b={batch} {mode:8s} {name:18s} {med:8.1f} tok/s  [{min(values):.1f}, {max(values):.1f}]  x{med / base:.3f}",
            flush=True,
        )


def bench_shape(shape: str, batches, repeats: int, new: int, rows: list) -> None:
    model = build(shape)
    tok = tiny_tokenizer()
    prompts_all = load_contexts()[:64]
    band = resolve_layers((0.45, 0.55), n_layers(model))[:3]
    vec_band = random_vector(model, band)
    vec_all = random_vector(model, range(n_layers(model)))
    print(f"\n## {shape}: {n_layers(model)} layers, hidden {hidden_size(model)}, band {band}", flush=True)

    for batch in batches:
        prompts = prompts_all[:batch]
        # eager: steering switched per call (apply/bake are cheap there), variants interleaved
        eager = {
            "unsteered": nullcontext,
            "hooks band": lambda: vec_band.apply(model, 1.0),
            "hooks all": lambda: vec_all.apply(model, 1.0),
            "bias band": lambda: vec_band.bake(model, 1.0),
        }
        results = {name: [] for name in eager}
        for factory in eager.values():
            timed_generate(model, tok, prompts, new, False, factory, batch)
        names = list(eager)
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                results[name].append(timed_generate(model, tok, prompts, new, False, eager[name], batch)[0])
        record(rows, shape, batch, "eager", results)
        # compiled: each variant's steering is installed once for its block (a slot for hooks,
        # a baked bias), then warm-up (compiles) and timed repeats; unsteered runs first and
        # last to expose drift
        blocks = {
            "unsteered": nullcontext,
            "hooks band": lambda: slot_set(SteeringSlot(model, band), vec_band),
            "hooks all": lambda: slot_set(SteeringSlot(model, list(range(n_layers(model)))), vec_all),
            "bias band": lambda: vec_band.bake(model, 1.0),
            "unsteered (again)": nullcontext,
        }
        results = {}
        for name, block in blocks.items():
            with block():
                timed_generate(model, tok, prompts, new, True, nullcontext, batch)
                results[name] = [
                    timed_generate(model, tok, prompts, new, True, nullcontext, batch)[0] for _ in range(repeats)
                ]
        record(rows, shape, batch, "compiled", results)

    # recompiles when the coefficient changes, and compiled == eager (batch 8, band)
    prompts = prompts_all[:8]
    with SteeringSlot(model, band) as slot:
        slot.set(vec_band, 1.0)
        _, eager = timed_generate(model, tok, prompts, new, False, nullcontext, 8)
        _, comp = timed_generate(model, tok, prompts, new, True, nullcontext, 8)
        same = sum(a.token_ids == b.token_ids for a, b in zip(eager, comp))
        first_diff = [
            next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
            for a, b in zip(eager, comp)
        ]
        print(
            f"{shape}: compiled vs eager steered (bf16, slot, b=8): {same}/8 identical; first differing position per row: {first_diff}"
        )
        g0 = dynamo_graphs()
        for coeff in (0.5, 1.5, 2.5):
            slot.set(vec_band, coeff)
            timed_generate(model, tok, prompts, new, True, nullcontext, 8)
        print(f"{shape}: new dynamo graphs over 3 coefficient changes via SteeringSlot: {dynamo_graphs() - g0}")
    for label, manager in (("vec.apply per call", vec_band.apply), ("vec.bake per call", vec_band.bake)):
        g0 = dynamo_graphs()
        for coeff in (0.5, 1.5, 2.5):
            timed_generate(model, tok, prompts, new, True, lambda c=coeff: manager(model, c), 8)
        print(f"{shape}: new dynamo graphs over 3 coefficient changes via {label}: {dynamo_graphs() - g0}")
    # batched vs one-at-a-time, steered (hooks band), eager and compiled
    for compiled in (False, True):
        with SteeringSlot(model, band) as slot:
            slot.set(vec_band, 1.0)
            timed_generate(model, tok, prompts_all[:32], new, compiled, nullcontext, 32)
            timed_generate(model, tok, prompts_all[:1], new, compiled, nullcontext, 1)
            b32, _ = timed_generate(model, tok, prompts_all[:32], new, compiled, nullcontext, 32)
            b1, _ = timed_generate(model, tok, prompts_all[:8], new, compiled, nullcontext, 1)
        mode = "compiled" if compiled else "eager"
        print(f"{shape}: steered {mode}: batch 32 {b32:.1f} tok/s vs one at a time {b1:.1f} tok/s = x{b32 / b1:.1f}")
    model = None  # free the weights before the next shape
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="0.5b,4b")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    import transformers

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    print(f"{name} | torch {torch.__version__} | transformers {transformers.__version__}")
    rows: list = []
    for shape in args.shapes.split(","):
        bench_shape(shape, [int(b) for b in args.batches.split(",")], args.repeats, args.new, rows)
    print("\n| shape | batch | decode | variant | tok/s (median) | min | max | vs unsteered |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, batch, mode, name, med, lo, hi, ratio in rows:
        print(f"| {shape} | {batch} | {mode} | {name} | {med:.1f} | {lo:.1f} | {hi:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
