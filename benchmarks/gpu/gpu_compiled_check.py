"""Does steering survive compiled (static-cache) decoding? Token-level check on a GPU.

fp32 random-weight Qwen2-0.5B shape, greedy, a large random steering vector so its effect
is unmistakable. For each way of steering (SteeringSlot, vec.apply, vec.bake) compiled
output must equal eager output of the same steering, and differ from unsteered output.
Counts new dynamo graphs per step.  PYTHONPATH=. python benchmarks/gpu/gpu_compiled_check.py
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, "benchmarks/gpu")
from gpu_throughput import SHAPES, dynamo_graphs  # noqa: E402

from steer_heal import SteeringVector, generate  # noqa: E402
from steer_heal.data import load_contexts  # noqa: E402
from steer_heal.models.model import hidden_size, n_layers, resolve_layers  # noqa: E402
from steer_heal.models.tiny import tiny_tokenizer  # noqa: E402
from steer_heal.sampling import Sampling
from steer_heal.steering.slot import SteeringSlot  # noqa: E402


def main() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = sys.argv[1] if len(sys.argv) > 1 else "0.5b"
    dtype = getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = Qwen2Config(
        **SHAPES[shape],
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=3,
        pad_token_id=0,
        initializer_range=0.08,
    )  # peaked logits: fewer argmax near-ties between kernels
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    tok = tiny_tokenizer()
    prompts = load_contexts()[:4]
    band = resolve_layers((0.45, 0.55), n_layers(model))
    g = torch.Generator().manual_seed(1)
    vec = SteeringVector(
        {l: torch.randn(hidden_size(model), generator=g) for l in band}, hidden_size(model), n_layers(model)
    )

    def run(compiled, ctx=None, **kw):
        g0 = dynamo_graphs()
        if ctx is None:
            out = generate(model, tok, prompts, compiled=compiled, **kw, sampling=Sampling(max_new_tokens=24))
        else:
            with ctx:
                out = generate(model, tok, prompts, compiled=compiled, **kw, sampling=Sampling(max_new_tokens=24))
        return [c.token_ids for c in out], dynamo_graphs() - g0

    eager = {c: run(False, steering=vec, coeff=c)[0] for c in (0.0, 4.0, 8.0)}
    assert eager[4.0] != eager[0.0], "vector too weak to see"
    checks = []

    def check(label, tokens, coeff, graphs):
        same = sum(a == b for a, b in zip(tokens, eager[coeff]))
        steered_effect = tokens != eager[0.0] if coeff else None
        checks.append((label, coeff, same, len(tokens), steered_effect, graphs))
        print(
            f"{label:34s} c={coeff:<4} matches eager {same}/{len(tokens)} rows; differs from unsteered: {steered_effect}; new graphs {graphs}",
            flush=True,
        )

    tokens, graphs = run(True)
    check("compiled, unsteered (first)", tokens, 0.0, graphs)
    slot = SteeringSlot(model, band)
    with slot:
        for coeff in (4.0, 8.0, 0.0, 4.0):
            slot.set(vec, coeff)
            tokens, graphs = run(True)
            check("compiled, SteeringSlot", tokens, coeff, graphs)
    tokens, graphs = run(True)
    check("compiled, unsteered (slot removed)", tokens, 0.0, graphs)
    for coeff in (4.0, 8.0):
        tokens, graphs = run(True, steering=vec, coeff=coeff)
        check("compiled, vec.apply per call", tokens, coeff, graphs)
    for coeff in (4.0, 8.0):
        tokens, graphs = run(True, steering=vec, coeff=coeff, how="bias")
        check("compiled, vec.bake per call", tokens, coeff, graphs)
    tokens, graphs = run(True)
    check("compiled, unsteered (last)", tokens, 0.0, graphs)
    # torch's default, for contrast: compile unsteered, then add hooks; does steering survive?
    from steer_heal.models.model import chat_prompt, encode, left_pad

    ids, mask, _ = left_pad([encode(tok, chat_prompt(tok, p)) for p in prompts], 0, device)
    settings = dict(max_new_tokens=24, do_sample=False, cache_implementation="static", pad_token_id=0, eos_token_id=3)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True), torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, **settings)
        with vec.apply(model, 4.0):
            hooked = model.generate(input_ids=ids, attention_mask=mask, **settings)[:, ids.shape[1] :]
    rows = [tuple(r) for r in hooked.tolist()]
    lost = sum(r[: len(e)] == e for r, e in zip(rows, eager[0.0]))
    kept = sum(r[: len(e)] == e for r, e in zip(rows, eager[4.0]))
    print(
        f"torch default (hook guards skipped), hooks added after compile: {kept}/4 rows steered, {lost}/4 rows equal UNSTEERED output"
    )
    bad = [c for c in checks if c[2] != c[3]]
    print(
        f"\n{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'} {dtype}: {len(checks) - len(bad)}/{len(checks)} compiled runs equal eager token for token"
    )


if __name__ == "__main__":
    main()
