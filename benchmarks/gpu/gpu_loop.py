"""One loop round on a GPU, compiled and eager decoding side by side.

    PYTHONPATH=. python benchmarks/gpu/gpu_loop.py --out OUT            # (a) and (b), one H200: about 8 minutes
    PYTHONPATH=. python benchmarks/gpu/gpu_loop.py --only a|b

(a) The embedded SmolLM2-135M, `--preset full --rounds 1`, bfloat16: seconds per stage,
    generated tokens per second in collect, peak GPU memory; `run.compiled` false then true.
(b) A random-weight model of the Qwen2 4B shape (hidden 2560, 36 layers): `collect` alone
    with every completion kept (random text has no filter to pass), 80 completions of 96
    tokens, bfloat16, eager then compiled. Random weights rarely emit a stop token, so every
    completion runs to the token limit: tokens per second count all of them.
Timings are ratios measured side by side in one process on one card; the first compiled
call pays for the compile (reported apart as warm-up).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from steer_heal.filters import Verdict
from steer_heal.filters.dose import collect
from steer_heal.run import config as cfg
from steer_heal.run import loop
from steer_heal.run.runlog import RunDir
from steer_heal.sampling import Sampling
from steer_heal.steering.generation import compiled_graphs
from steer_heal.steering.vector import SteeringVector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_throughput import SHAPES  # noqa: E402


class KeepAll:
    name = "keep_all"

    def __call__(self, completions):
        return [Verdict(True, {}, []) for _ in completions]


def loop_round(root: Path, compiled: bool) -> dict:
    config = cfg.resolve(
        "full",
        overrides={"run": {"rounds": 1, "device": "cuda", "dtype": "bfloat16", "compiled": str(compiled).lower()}},
    )
    torch.cuda.reset_peak_memory_stats()
    graphs = compiled_graphs()
    t0 = time.perf_counter()
    with RunDir.create(root / f"compiled_{compiled}", config) as run:
        loop.run(config, run, progress=False)
        events = run.events()
    seconds = time.perf_counter() - t0
    round_event = next(e for e in events if e["event"] == "round")
    gen = next(e for e in events if e["event"] == "gen")
    tokens = sum(len(c["token_ids"]) for c in gen["completions"])
    base = sum(e.get("seconds", 0) for e in events if e["round"] == -1)
    return {
        "compiled": compiled,
        "wall_s": seconds,
        "base_stage_s": base,
        "round_s": sum(round_event["timings"].values()),
        "timings": round_event["timings"],
        "collect_tokens": tokens,
        "collect_tok_s": tokens / round_event["timings"]["collect"],
        "dose": round_event["coeff"],
        "graphs": compiled_graphs() - graphs,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def random_4b(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SHAPES["4b"], max_position_embeddings=4096, bos_token_id=1, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    model.config._name_or_path = "random-qwen2-4b"
    model.generation_config.eos_token_id = 3
    return model


def collect_4b(model, tok, vec, prompts, compiled: bool) -> dict:
    sampling = Sampling(max_new_tokens=96, do_sample=True, batch_size=16)
    kw = dict(n_keep=80, max_batches=5, sampling=sampling, compiled=compiled, seed=0)
    t0 = time.perf_counter()
    collect(model, tok, vec, prompts, KeepAll(), 1.0, n_keep=16, max_batches=1, sampling=sampling, compiled=compiled)
    warm = time.perf_counter() - t0  # first batch: compiles when compiled
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    got = collect(model, tok, vec, prompts, KeepAll(), 1.0, **kw)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) + (c.finish_reason == "stop") for c in got.completions)
    stopped = sum(c.finish_reason == "stop" for c in got.completions)
    return {
        "compiled": compiled,
        "warmup_s": warm,
        "seconds": seconds,
        "completions": len(got.completions),
        "stopped_early": stopped,
        "tokens": tokens,
        "tok_s": tokens / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["a", "b"], default=None)
    ap.add_argument("--out", default="out/gpu_loop")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if args.only in (None, "a"):
        result["a"] = [loop_round(out / "runs", False), loop_round(out / "runs", True)]
        print(json.dumps(result["a"], indent=1), flush=True)
    if args.only in (None, "b"):
        from steer_heal.data import load_axis
        from steer_heal.models.tiny import tiny_tokenizer

        tok = tiny_tokenizer()
        model = random_4b(tok)
        g = torch.Generator().manual_seed(1)
        vec = SteeringVector(
            {layer: torch.randn(2560, generator=g) for layer in (16, 17, 18, 19)},
            hidden_size=2560,
            n_layers=36,
            model_id="random-qwen2-4b",
        )
        prompts = load_axis("authority").prompts
        result["b"] = [collect_4b(model, tok, vec, prompts, False), collect_4b(model, tok, vec, prompts, True)]
        print(json.dumps(result["b"], indent=1), flush=True)
    (out / "gpu_loop.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
