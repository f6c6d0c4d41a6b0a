"""Compile once per machine (issue 26, items 2 and 4): the first compiled batch in a fresh
process with an empty steer-heal compile cache, then in a second process that finds it
warm; and collect at batch 16 and 64, compiled against eager, in the warm process.

    PYTHONPATH=. python benchmarks/gpu/gpu_compile_cache.py --shape 4b --out OUT
    GPU_COMPILE_CACHE_B64=0 ...   # batch 16 only (shorter)

Each measurement runs in a child process of its own (a process's in-memory compile caches
would otherwise hide the disk cache), one after the other, with STEER_HEAL_CACHE pointing at
a folder made empty for this script. Random-weight model of the shape, bfloat16, every
completion kept (random text has nothing to filter), 96 new tokens; random weights rarely
stop early, and tokens are counted as generated.

Pre-registered reading (written before the run): the cache works if the warm process's
first compiled batch of 16 is at most 10 s and shows inductor FX-graph cache hits and no
misses; compiled wins at a shape if its collect tokens/s at batch 16, with the warm first
batch counted in, beat eager's over the same 80 completions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(shape: str, mode: str) -> dict:
    from gpu_loop import KeepAll
    from gpu_round_4b import random_model
    from gpu_throughput import random_vector
    from torch._dynamo.utils import counters

    from steer_heal.data import load_axis
    from steer_heal.filters.dose import collect
    from steer_heal.models.compile_cache import use_compile_cache
    from steer_heal.models.model import n_layers, resolve_layers
    from steer_heal.models.tiny import tiny_tokenizer
    from steer_heal.sampling import Sampling

    t0 = time.perf_counter()
    folder = use_compile_cache()
    tok = tiny_tokenizer("chatml")
    model = random_model(shape, "cuda", torch.bfloat16)
    vec = random_vector(model, resolve_layers([0.25, 0.75], n_layers(model)))
    prompts = load_axis("love").prompts
    out = {"shape": shape, "mode": mode, "folder": str(folder), "build_s": time.perf_counter() - t0}

    def timed_collect(batch: int, n: int, compiled: bool) -> tuple[float, int]:
        sampling = Sampling(max_new_tokens=96, do_sample=True, batch_size=batch)
        torch.cuda.synchronize()
        start = time.perf_counter()
        got = collect(
            model,
            tok,
            vec,
            prompts,
            KeepAll(),
            1.0,
            n_keep=n,
            max_batches=n // batch,
            sampling=sampling,
            compiled=compiled,
            seed=0,
        )
        torch.cuda.synchronize()
        return time.perf_counter() - start, sum(len(c.token_ids) + (c.finish_reason == "stop") for c in got.completions)

    compiled = mode != "eager"
    first, _ = timed_collect(16, 16, compiled)  # the first batch of 16: compiles, or loads, or (eager) warms up
    out["first_batch16_s"] = first
    seconds, tokens = timed_collect(16, 80, compiled)
    out["batch16"] = {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds}
    out["batch16_with_first_tok_s"] = (tokens + 16 * 96) / (seconds + first)
    if os.environ.get("GPU_COMPILE_CACHE_B64", "1") == "1":
        first64, _ = timed_collect(64, 64, compiled)
        out["first_batch64_s"] = first64
        seconds, tokens = timed_collect(64, 128, compiled)
        out["batch64"] = {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds}
    out["fxgraph_hits"] = counters["inductor"]["fxgraph_cache_hit"]
    out["fxgraph_misses"] = counters["inductor"]["fxgraph_cache_miss"]
    out["aot_hits"] = counters["aot_autograd"]["autograd_cache_hit"]
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["card"] = torch.cuda.get_device_name()
    out["torch"] = torch.__version__
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4b")
    ap.add_argument("--out", default="out/gpu_compile_cache")
    ap.add_argument("--modes", default="cold,warm,eager")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.shape, args.child)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
    env.update(STEER_HEAL_CACHE=str(cache), PYTHONPATH=os.environ.get("PYTHONPATH", "."))
    results = []
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "--shape", args.shape, "--child", mode], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            results.append({"mode": mode, "error": done.stderr[-2000:]})
        else:
            results.append({**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0})
        print(json.dumps(results[-1]), flush=True)
        (out / f"compile_cache_{args.shape}.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
