"""Batched, optionally steered generation -> `Completion` records.

Prompts are user messages; each is chat-formatted (with an optional system persona),
tokenised without extra special tokens and left-padded into batches, so greedy batched
output equals one-at-a-time output. Sampling is seeded per batch (`seed + batch index`)
inside a forked RNG, so the caller's global RNG state is untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InputError, OutOfMemory, is_out_of_memory
from ..models.compile_cache import use_compile_cache
from ..models.model import chat_prompt, context_window, encode, input_device, left_pad, pad_id, stop_token_ids
from ..runtime import seeded
from ..sampling import GREEDY, Sampling
from ..shards import map_batches
from ..vocab import Number, SteerHow
from .graphs import decode_graphs, graphable
from .hooks import Steering, check_coeff, per_row_coeffs, steer, steering_coeff

PROMPT_BUCKET = 32  # compiled decoding pads prompts to a multiple of this: a few graphs serve every batch


SHAPES_ATTR = "_steer_heal_compiled_shapes"  # the (rows, prompt width, new tokens) a model has decoded compiled


def compiled_graphs() -> int:
    """How many distinct graphs torch.compile has made in this process (for the logs)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def recompile_limit() -> int:
    """torch's cap on graphs per compiled function (`recompile_limit`, once `cache_size_limit`)."""
    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", None) or getattr(config, "cache_size_limit", 8))


def _compiled_shape_ok(model: nn.Module, shape: tuple[int, int, int]) -> bool:
    """Whether a static-cache batch of this shape may decode compiled. Each new shape is a
    new graph; once torch's recompile limit would be passed, torch itself falls back to
    eager without a word, so this warns once (with the graph count) and says eager."""
    shapes = getattr(model, SHAPES_ATTR, None)
    if shapes is None:
        shapes = set()
        setattr(model, SHAPES_ATTR, shapes)
    if shape in shapes:
        return True
    limit = recompile_limit()
    if len(shapes) >= limit:
        if not getattr(model, SHAPES_ATTR + "_warned", False):
            warnings.warn(
                f"compiled decoding reached torch's recompile limit ({limit} graphs for {len(shapes)} batch shapes, "
                f"{compiled_graphs()} graphs in this process); new shapes decode eager from here on. Use fewer batch "
                "sizes, or raise torch._dynamo.config.recompile_limit",
                RuntimeWarning,
                stacklevel=3,
            )
            setattr(model, SHAPES_ATTR + "_warned", True)
        return False
    shapes.add(shape)
    return True


@dataclass(frozen=True)
class Completion:
    """One generated answer and how it was made."""

    prompt: str  # the user message
    text: str  # decoded completion, without the stop token
    token_ids: tuple[int, ...]  # completion tokens, without the stop token
    coeff: float  # the steering actually active while it was made (`steering.steering_coeff`)
    finish_reason: Literal["stop", "length"]
    system: str | None = None
    prompt_text: str = ""  # the chat-formatted prompt the model saw

    def to_dict(self) -> dict:
        record = asdict(self)
        record["token_ids"] = list(self.token_ids)
        return record

    @classmethod
    def from_dict(cls, record: dict) -> Completion:
        return cls(**{**record, "token_ids": tuple(record["token_ids"])})

    def formatted_prompt(self, tok) -> str:
        """The chat-formatted prompt this completion answered (rebuilt if not recorded)."""
        return self.prompt_text or chat_prompt(tok, self.prompt, system=self.system)


def generate(
    model: nn.Module,
    tok,
    prompts: Sequence[str],
    steering: Steering | None = None,
    coeff: Number | Sequence[Number] = 0.0,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    system: str | None = None,
    how: SteerHow = "hooks",
    progress: bool | None = None,
    compiled: bool = False,
    allow_other_model: bool = False,
) -> list[Completion]:
    """Generate one completion per prompt, steered by `coeff * steering` if given.

    `sampling` says how to decode (greedy by default). Each completion records the
    steering coefficient actually active (`Completion.coeff`): `coeff` when `steering` is
    given, a `SteeringSlot`'s or a baked vector's coefficient when one is active, else 0.

    `compiled=True` decodes with a static KV cache, which transformers compiles on GPUs.
    torch's default (`skip_nnmodule_hook_guards=True`) lets a compiled graph silently keep
    running whichever hooks existed when it was traced, so steering added later would be
    ignored; compiled generation here turns those guards on, so a change of hooks
    recompiles instead of being lost. To change coefficients without recompiling, steer
    through a `SteeringSlot` (buffers rewritten in place; pass no `steering` here).

    `sampling.cuda_graphs` (eager decoding on one CUDA device) decodes each batch over a
    static cache and replays one captured CUDA graph per token (`steering.graphs`): the same
    tokens without transformers' per-token Python; a model it cannot capture (positional
    steering, a device map) decodes as before, with a warning that says why.

    `coeff` may be one number per prompt (eager, hooks): each batch is then steered row by
    row (`SteeringVector.apply` with per-row coefficients), so prompts at several doses
    share one batch, and each completion records its own coefficient. Prompts
    are left-padded to a multiple of `PROMPT_BUCKET` tokens, so the number of graphs stays
    bounded (`compiled_graphs()` counts them); past torch's recompile limit, new shapes
    decode eager with a warning rather than silently.
    """
    from transformers import GenerationConfig

    if isinstance(prompts, str):
        raise InputError("prompts must be a list of user messages, not one string; wrap it: [prompt]")
    if not prompts:
        raise InputError("no prompts to generate from")
    batches = -(-len(prompts) // max(1, sampling.batch_size))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**63 - 1 - batches:
        raise InputError(f"seed must be an integer in [0, 2**63 - {1 + batches}] (batch b uses seed + b), got {seed!r}")
    rows_coeff = per_row_coeffs(coeff)
    if rows_coeff is None:
        coeff = check_coeff(coeff)
    elif steering is None or how != "hooks" or compiled or len(rows_coeff) != len(prompts):
        raise InputError(
            f"per-prompt coefficients need a steering vector applied by hooks in eager decoding and one number "
            f"per prompt; got {len(rows_coeff)} coefficients for {len(prompts)} prompts, how={how!r}, "
            f"compiled={compiled}, steering={'given' if steering is not None else 'None'}"
        )
    if compiled:
        use_compile_cache()  # a second process on this machine loads the graphs instead of compiling
    stops = stop_token_ids(model, tok)
    settings = dict(sampling.hf_settings(), pad_token_id=pad_id(tok), eos_token_id=stops)
    batch_size = sampling.batch_size
    eager_config = GenerationConfig(**settings)
    config = GenerationConfig(**settings, cache_implementation="static") if compiled else eager_config
    # graphed: eager steps over a static cache (transformers must not compile it), one graph per batch
    graphed_config = GenerationConfig(**settings, cache_implementation="static", disable_compile=True)

    texts = [chat_prompt(tok, prompt, system=system) for prompt in prompts]
    token_lists = [encode(tok, text) for text in texts]
    window = context_window(model)
    longest = max(len(t) for t in token_lists)
    if window is not None and longest + sampling.max_new_tokens > window:
        raise InputError(
            f"the longest prompt has {longest} tokens and max_new_tokens is {sampling.max_new_tokens}: "
            f"{longest + sampling.max_new_tokens} > the model's context window of {window} tokens; shorten the "
            "prompt or lower max_new_tokens"
        )
    order = sorted(range(len(texts)), key=lambda i: len(token_lists[i]))
    device = input_device(model)
    results: list[Completion | None] = [None] * len(texts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    show = progress if progress is not None else len(batches) > 1
    guards = torch._dynamo.config.patch(skip_nnmodule_hook_guards=False) if compiled else nullcontext()
    shared = steer(model, steering, coeff, how, allow_other_model) if rows_coeff is None else nullcontext()
    with torch.inference_mode(), guards, shared:
        applied = steering_coeff(model)
        graphs = sampling.cuda_graphs and not compiled and device.type == "cuda"
        if graphs and (why := graphable(model)) is not None:
            warnings.warn(f"decoding without CUDA graphs: {why}", RuntimeWarning, stacklevel=2)
            graphs = False
        label = f"c={applied:g}" if rows_coeff is None else "per-prompt coefficients"
        bar = tqdm(total=len(batches), desc=f"generate {label}", disable=not show, leave=False)

        def one(index: int) -> list[Completion]:
            rows = batches[index]
            ids, mask, _ = left_pad(
                [token_lists[i] for i in rows], pad_id(tok), device, multiple=PROMPT_BUCKET if compiled else 1
            )
            chosen = graphed_config if graphs else config
            if compiled and not _compiled_shape_ok(model, (len(rows), ids.shape[1], sampling.max_new_tokens)):
                chosen = eager_config
            by_row = (
                nullcontext()
                if rows_coeff is None
                else steering.apply(model, [rows_coeff[i] for i in rows], allow_other_model)  # type: ignore[union-attr]
            )
            with seeded(seed + index, device), by_row, decode_graphs(model) if graphs else nullcontext():
                try:
                    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=chosen)
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    raise OutOfMemory(
                        f"out of memory generating {len(rows)} prompts x ({ids.shape[1]} + {sampling.max_new_tokens}) "
                        f"tokens on {device}; lower the batch size (Sampling.batch_size, {sampling.batch_size} now; "
                        "generate.batch_size in a run config) or max_new_tokens"
                    ) from None
            made = []
            for row, i in enumerate(rows):
                new = out[row, ids.shape[1] :].tolist()
                cut = next((k for k, t in enumerate(new) if t in stops), None)
                kept = new if cut is None else new[:cut]
                made.append(
                    Completion(
                        prompt=prompts[i],
                        text=tok.decode(kept, skip_special_tokens=True),
                        token_ids=tuple(kept),
                        coeff=applied if rows_coeff is None else rows_coeff[i],
                        finish_reason="length" if cut is None else "stop",
                        system=system,
                        prompt_text=texts[i],
                    )
                )
            bar.update(1)
            return made

        try:
            for rows, made in zip(batches, map_batches(one, len(batches))):  # seeded by batch: any process, same rows
                for i, completion in zip(rows, made):
                    results[i] = completion
        finally:
            bar.close()
    return results  # type: ignore[return-value]
