"""A whole loop round at the size users run (issue 26, item 1): the loop's own code on a
random-weight model of the Qwen2/Qwen3 4B shape (and the Llama-3-8B and SmolLM2-135M shapes), bfloat16, one GPU.

    PYTHONPATH=. python benchmarks/gpu/gpu_round_4b.py --out OUT [--shape 4b|8b] [--compiled false|true] [--rounds N]
    PYTHONPATH=. python benchmarks/gpu/gpu_round_4b.py --shape tiny --device cpu --out OUT   # CPU smoke test

`steer_heal.run.loop.run` with the full preset's sizes, one round: base and prompted
evaluation, the anchor's neutral completions, then extract, dose walk (speculative on CUDA),
collect, steered evaluation, heal (KLRev + anchor, LoRA), fold, healed evaluation. Random
text means nothing, so two swaps, both allowed by the issue: the filter keeps every
completion (`KeepAll`; with it the walk's probes all pass), and the drift instruments are
off (the MiniLM embedder is not staged on the GPU machine; their cost on SmolLM2 is in
docs/benchmarks.md). Everything else is the loop's code. Reported: seconds per stage,
generated tokens per second in collect, heal seconds and trained tokens per second, peak
GPU memory. Random weights rarely emit a stop token: completions run to the token limit.
With `--rounds N` the loop runs N rounds in the one process and each round's stages are
reported (`per_round`): later rounds show the steady state, after the first has paid for
whatever compiles or warms up; the top-level fields describe round 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from steer_heal.data import load_axis, load_contexts
from steer_heal.healing.history import History
from steer_heal.models.tiny import tiny_tokenizer
from steer_heal.run import config as cfg
from steer_heal.run import loop
from steer_heal.run.runlog import RunDir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_loop import KeepAll  # noqa: E402
from gpu_throughput import SHAPES  # noqa: E402

SHAPES = {
    **SHAPES,
    "8b": dict(  # Llama-3-8B
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
    ),
    "smollm2": dict(  # SmolLM2-135M's shape, random weights: the host-bound end of the range
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}
LLAMA_SHAPES = {"8b", "smollm2"}


def random_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    make, kind = (LlamaConfig, LlamaForCausalLM) if shape in LLAMA_SHAPES else (Qwen2Config, Qwen2ForCausalLM)
    config = make(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=1, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = kind(config).to(dtype).eval()
    model.config._name_or_path = f"random-{shape}"
    model.generation_config.eos_token_id = 3
    return model


def one_round(shape: str, device: str, compiled: str, root: Path, rounds: int = 1, graphs: bool = False) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    overrides = {
        "run": {"rounds": rounds, "device": device, "dtype": str(dtype).removeprefix("torch."), "compiled": compiled},
        "drift": {"enabled": False},
        "eval": {"coherence_floor": 0.0},  # random text: never stop on coherence, so later rounds run
    }
    if graphs:  # only when asked: an older tree (gpu_heal_ab.sh's "before") has no such key
        overrides["generate"] = {"cuda_graphs": True}
    config = cfg.resolve("full", overrides=overrides)
    tok = tiny_tokenizer("chatml")
    model = random_model(shape, device, dtype)
    axis = load_axis(config.run.axis)
    setup = loop.Setup(
        History(model),
        tok,
        axis,
        load_contexts()[: config.extract.n_contexts],
        loop.probes(config, config.run.seed, axis),
    )
    real_filter = loop.round_filter
    loop.round_filter = lambda config, s, seed: (KeepAll(), None)  # random text: keep every completion
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        with RunDir.create(root / f"{shape}_compiled_{compiled}", config) as run:
            loop.run(config, run, setup, progress=False)
            events = run.events()
    finally:
        loop.round_filter = real_filter
    wall = time.perf_counter() - t0
    round_event = next(e for e in events if e["event"] == "round")
    gen = next(e for e in events if e["event"] == "gen")
    heal = next(e for e in events if e["event"] == "heal")
    timings = round_event["timings"]
    per_round = [
        {"round": e["round"], "round_s": sum(e["timings"].values()), "timings": e["timings"]}
        for e in events
        if e["event"] == "round"
    ]
    tokens = sum(len(c["token_ids"]) for c in gen["completions"])
    trained = sum(s.get("tokens", 0) for s in heal["steps"])
    base = {e["stage"]: e.get("seconds", 0.0) for e in events if e["event"] == "eval" and e["round"] == -1}
    return {
        "shape": shape,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "compiled": compiled,
        "cuda_graphs": graphs,
        "wall_s": wall,
        "base_stage_s": base,
        "round_s": sum(timings.values()),
        "timings": timings,
        "per_round": per_round,
        "collect_completions": len(gen["completions"]),
        "collect_tokens": tokens,
        "collect_tok_s": tokens / timings["collect"],
        "heal_s": heal["seconds"],
        "heal_trained_tokens": trained,
        "heal_tok_s": trained / heal["seconds"] if heal["seconds"] else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="4b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compiled", choices=["false", "true"], default="false")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cuda-graphs", action="store_true", help="generate.cuda_graphs = true (steering.graphs)")
    ap.add_argument("--tag", default="", help="appended to the result file's name")
    ap.add_argument("--out", default="out/gpu_round_4b")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = one_round(args.shape, args.device, args.compiled, out / f"runs{args.tag}", args.rounds, args.cuda_graphs)
    print(json.dumps(result, indent=1), flush=True)
    (out / f"round_{args.shape}_compiled_{args.compiled}{args.tag}.json").write_text(
        json.dumps(result, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
