"""A model split by an accelerate device map vs the same model on one device. No downloads.

Random weights of a real shape (Qwen2-0.5B: 24 layers, hidden 896), fp32 so the numbers
can be compared tightly. The split puts the embedding and the first half of the layers on
cuda:0 and the rest on the next GPU, or on the CPU when there is only one GPU (the
one-GPU stand-in for two cards: every activation still crosses a device boundary).

Checks, each split vs one device: extraction, steered logits (hooks), hook vs bias on the
split model, steered greedy generation token for token, one heal step (loss, gradient
norm and LoRA weights after the step), and steered generation throughput.

    PYTHONPATH=. python benchmarks/gpu/gpu_device_map.py [--shape 0.5b] [--new 32] [--batch 8]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from steer_heal import Completion, SteeringVector, generate
from steer_heal.evaluate import Vignettes, load_vignettes, stratified_subset
from steer_heal.filters import PPL, default_filter
from steer_heal.healing.history import History
from steer_heal.healing.regularizers import KLRev, SpectralNorm
from steer_heal.healing.train import LoraSettings, TrainSettings, heal
from steer_heal.models.model import execution_device
from steer_heal.models.tiny import tiny_tokenizer
from steer_heal.sampling import Sampling

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_throughput import SHAPES  # noqa: E402  one table of model shapes for the GPU benchmarks


def build(shape: str, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **SHAPES[shape],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = 3
    return model.to(device)


def split(model, second: str):
    from accelerate import dispatch_model

    n = model.config.num_hidden_layers
    first = "cuda:0" if torch.cuda.is_available() else "cpu"
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": second, "lm_head": second}
    device_map |= {f"model.layers.{i}": (first if i < n // 2 else second) for i in range(n)}
    # main_device "cpu": accelerate would otherwise treat "cpu" entries as offload (weights
    # streamed to the GPU per forward) instead of layers that compute on the CPU
    return dispatch_model(
        model, device_map=device_map, main_device="cpu" if second == "cpu" else first, force_hooks=True
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def sync() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def throughput(model, tok, vec, prompts, new, batch, repeats=3) -> float:
    best = 0.0
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        outs = generate(
            model, tok, prompts, steering=vec, coeff=2.0, sampling=Sampling(max_new_tokens=new, batch_size=batch)
        )
        sync()
        best = max(best, sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
    return best


def one_heal_step(model, tok, completions, reg: str):
    history = History(model)
    regs = [KLRev(tau=0.0)] if reg == "klrev" else [SpectralNorm(lam=0.1)]
    try:
        result = heal(
            history,
            tok,
            completions,
            regs,
            lora=LoraSettings(r=8, alpha=16),
            train=TrainSettings(epochs=1, batch_size=len(completions), lr=1e-3, seed=0, val_frac=0.0, max_steps=1),
            round=0,
        )
        return result.steps[0], {k: v for k, v in result.adapter.state.items() if "lora_B" in k}
    finally:
        history.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5b", choices=list(SHAPES))
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    gpus = torch.cuda.device_count()
    one = "cuda:0" if gpus else "cpu"
    second = "cuda:1" if gpus >= 2 else "cpu"
    print(f"GPUs: {[torch.cuda.get_device_name(i) for i in range(gpus)]}; split over {one} and {second}", flush=True)
    single = build(args.shape, one)
    sharded = split(build(args.shape, "cpu"), second)
    print("layer devices:", sorted({str(execution_device(b)) for b in sharded.model.layers}))
    tok = tiny_tokenizer()
    contexts = ["Tell me about your day.", "What should I cook tonight?", "Explain tides.", "Any advice for a new job?"]
    vecs = [
        SteeringVector.from_persona_pair(
            m, tok, "You are warm and kind.", "You are cold and curt.", contexts, layers=(0.45, 0.55)
        )
        for m in (single, sharded)
    ]
    print(
        f"extraction, split vs one device: rel {max(rel(vecs[1].directions[k], vecs[0].directions[k]) for k in vecs[0].layers):.2e}"
    )
    vec = vecs[0]
    ids = tok(["Tell me a story about a dog."] * 2, return_tensors="pt").input_ids
    with torch.no_grad():
        with vec.apply(single, 2.0):
            want = single(ids.to(one)).logits
        with vec.apply(sharded, 2.0):
            got = sharded(ids.to(one)).logits
        with vec.bake(sharded, 2.0):
            baked = sharded(ids.to(one)).logits
    print(f"steered logits (hooks), split vs one device: rel {rel(got, want):.2e}")
    print(f"hook vs bias on the split model: rel {rel(baked, got):.2e}")
    prompts = [f"{c} Please answer briefly." for c in contexts] * (args.batch // len(contexts) or 1)
    a = generate(
        single, tok, prompts, steering=vec, coeff=2.0, sampling=Sampling(max_new_tokens=args.new, batch_size=args.batch)
    )
    b = generate(
        sharded,
        tok,
        prompts,
        steering=vec,
        coeff=2.0,
        sampling=Sampling(max_new_tokens=args.new, batch_size=args.batch),
    )
    print(f"steered greedy generation identical: {sum(x.token_ids == y.token_ids for x, y in zip(a, b))}/{len(a)}")
    # fixed texts: the random model's own tokens mostly fall outside the small tokenizer's vocabulary
    texts = [
        Completion(c, "Here is a short and careful answer to your question about it.", (), 2.0, "length")
        for c in contexts
    ]
    verdicts = [default_filter(m, tok, tau=1e9)(texts) for m in (single, sharded)]
    ppl = [[v.scores[PPL] for v in vs] for vs in verdicts]
    finite = [(x, y) for x, y in zip(ppl[1], ppl[0]) if math.isfinite(y)]
    same_inf = sum(x == y for x, y in zip(ppl[1], ppl[0]) if not math.isfinite(y))
    print(
        f"filter tail perplexity, split vs one device: max rel {max((abs(x - y) / y for x, y in finite), default=0):.2e} "
        f"over {len(finite)} finite, {same_inf} equal non-finite, of {len(ppl[0])}"
    )
    probe = Vignettes(items=stratified_subset(load_vignettes(), 14))
    m_one, m_split = probe(single, tok).metrics, probe(sharded, tok).metrics
    print(f"vignettes, split vs one device: max abs metric diff {max(abs(m_one[k] - m_split[k]) for k in m_one):.2e}")
    train = generate(
        single, tok, prompts[:4], steering=vec, coeff=2.0, seed=0, sampling=Sampling(max_new_tokens=16, do_sample=True)
    )
    step_a, lora_a = one_heal_step(single, tok, train, "klrev")
    step_b, lora_b = one_heal_step(sharded, tok, train, "klrev")
    # Adam's first step is about lr * sign(grad): entries whose gradient is ~0 can flip on float noise
    flipped = sum(int(((lora_b[k] - lora_a[k]).abs() > 1e-4).sum()) for k in lora_a) / sum(
        v.numel() for v in lora_a.values()
    )
    step_c, _ = one_heal_step(sharded, tok, train, "spectral")  # a regulariser that reads every LoRA layer
    print(
        f"one heal step: nll {step_a.nll:.6f} vs {step_b.nll:.6f}; grad norm {step_a.grad_norm:.6f} vs "
        f"{step_b.grad_norm:.6f}; LoRA B after the step: {flipped:.2%} of entries differ by > 1e-4; "
        f"SpectralNorm step on the split model: nll {step_c.nll:.6f}"
    )
    t_one = throughput(single, tok, vec, prompts, args.new, args.batch)
    t_split = throughput(sharded, tok, vec, prompts, args.new, args.batch)
    print(
        f"steered generation, batch {args.batch}, {args.new} new tokens: one device {t_one:.0f} tok/s, "
        f"split {t_split:.0f} tok/s, ratio {t_split / t_one:.3f}"
    )


if __name__ == "__main__":
    main()
