"""CPU benchmarks (pytest-benchmark): steered generation, extraction, perplexity filter.

    BENCH_MODEL=smollm2 python -m pytest benchmarks -q --benchmark-only   # full, on demand
    python -m pytest benchmarks -q --benchmark-disable                    # CI: each runs once

Timings are never asserted (machines are noisy). `test_interleaved_ratios` measures all
variants in interleaved rounds and prints tok/s and the ratio to unsteered.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import pytest

from steer_heal import generate
from steer_heal.data import load_contexts
from steer_heal.filters import Perplexity
from steer_heal.sampling import Sampling
from steer_heal.steering.extract import mean_difference

NEW = 32
VARIANTS = ["unsteered", "hooks 1 layer", "hooks all layers", "bias 1 layer", "bias all layers"]


def steering(name, vectors, model):
    if name == "unsteered":
        return nullcontext()
    how, _, which = name.partition(" ")
    vec = vectors[which]
    return vec.apply(model, 1.0) if how == "hooks" else vec.bake(model, 1.0)


def run_generation(model, tok, prompts):
    out = generate(model, tok, prompts, progress=False, sampling=Sampling(max_new_tokens=NEW, batch_size=len(prompts)))
    return sum(len(c.token_ids) + (c.finish_reason == "stop") for c in out)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("variant", VARIANTS)
def test_generation(benchmark, bench_model, vectors, axis, variant, batch):
    model, tok = bench_model
    prompts = axis.prompts[:batch]
    benchmark.group = f"generate batch {batch}"

    def go():
        with steering(variant, vectors, model):
            return run_generation(model, tok, prompts)

    tokens = benchmark.pedantic(go, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["tokens"] = tokens


def test_interleaved_ratios(bench_model, vectors, axis, capsys):
    model, tok = bench_model
    rows = []
    for batch in (1, 8):
        prompts = axis.prompts[:batch]
        rates = {v: [] for v in VARIANTS}
        for r in range(3):
            for variant in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:
                start = time.perf_counter()
                with steering(variant, vectors, model):
                    tokens = run_generation(model, tok, prompts)
                rates[variant].append(tokens / (time.perf_counter() - start))
        base = statistics.median(rates["unsteered"])
        rows += [(batch, v, statistics.median(x), statistics.median(x) / base) for v, x in rates.items()]
    with capsys.disabled():
        print("\n| batch | variant | tok/s (median of 3) | vs unsteered |\n|---|---|---|---|")
        for batch, variant, rate, ratio in rows:
            print(f"| {batch} | {variant} | {rate:.1f} | {ratio:.3f} |")


def test_extraction(benchmark, bench_model, axis):
    model, tok = bench_model
    contexts = load_contexts()[:32]
    benchmark.group = "extraction (32 contexts x 2 personas)"
    benchmark.pedantic(lambda: mean_difference(model, tok, axis.pos, axis.neg, contexts), rounds=2, iterations=1)


def test_perplexity_filter(benchmark, bench_model, axis):
    model, tok = bench_model
    completions = generate(
        model, tok, axis.prompts[:16], progress=False, sampling=Sampling(max_new_tokens=NEW, batch_size=16)
    )
    flt = Perplexity(model, tok, batch_size=8)
    benchmark.group = "perplexity filter (16 completions)"
    benchmark.pedantic(lambda: flt(completions), rounds=2, iterations=1)
