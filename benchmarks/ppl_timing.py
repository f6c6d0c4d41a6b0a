"""Wall time of the batched tail-perplexity filter: N completions of exactly T tokens.

    python benchmarks/ppl_timing.py --threads 2                      # embedded SmolLM2-135M
    python benchmarks/ppl_timing.py --random-init DIR --threads 2    # random weights from
                                                                     # DIR's config + tokenizer

Speed does not depend on weight values, so `--random-init` (a folder with config.json and
tokenizer files, e.g. the SmolLM2 cache folder without its safetensors) times the same
shapes on a machine without the model. Completions are the hand-labelled filter texts
packed end to end and cut to exactly T tokens; prompts are the bundled authority pool.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from steer_heal.data import load_axis
from steer_heal.filters import tail_perplexity
from steer_heal.models.model import chat_prompt, encode

LABELS = Path(__file__).resolve().parent.parent / "tests" / "data" / "filter_labels.jsonl"


def load(args):
    if args.random_init is None:
        from steer_heal import load_model

        return load_model("smollm2-135m")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.random_init)
    config = AutoConfig.from_pretrained(args.random_init)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random-init", default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load(args)
    model.to(args.device)

    stream = [t for line in LABELS.read_text().splitlines() for t in encode(tok, json.loads(line)["text"] + "\n\n")]
    texts = []
    for i in range(args.n):
        start = (i * 37) % (len(stream) - args.tokens)  # overlapping windows, different starts
        texts.append(tok.decode(stream[start : start + args.tokens]))
    prompts = [chat_prompt(tok, p) for p in load_axis("authority").prompts]
    prompts = [prompts[i % len(prompts)] for i in range(args.n)]
    lengths = [len(encode(tok, t)) for t in texts]
    prompt_lengths = [len(encode(tok, p)) for p in prompts]
    print(
        f"{args.n} completions, {statistics.fmean(lengths):.1f} tokens (min {min(lengths)}, max {max(lengths)}) "
        f"after re-encoding; prompts {statistics.fmean(prompt_lengths):.0f} tokens; {args.device}, {args.threads} threads; "
        f"load average {os.getloadavg()}"
    )
    tail_perplexity(model, tok, prompts[:2], texts[:2])  # warm-up
    for batch_size in args.batch_sizes:
        t0 = time.perf_counter()
        tail_perplexity(model, tok, prompts, texts, tail=0.25, batch_size=batch_size)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"batch_size {batch_size}: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
