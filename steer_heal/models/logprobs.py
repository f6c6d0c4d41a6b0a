"""One log-prob engine: next-token log-probs at chosen positions only.

An `Example` is a token sequence whose first `n_prompt` ids are context and whose
remaining ids are targets; each target `ids[t]` is predicted from position `t - 1`. A
`Batch` left-pads examples (position ids count real tokens only, so a padded row computes
what it computes alone) and lists the target positions row-major.

`target_logprobs` runs the model with a forward pre-hook on the output head that gathers
the hidden states at those positions, so the head sees `[n, hidden]` and the logits are
`[n, vocab]`, never `[batch, seq, vocab]`: prompt and padding positions cost no head
matmul and no memory. Every NLL in the library comes from here: the filter's tail
perplexity (targets: the last k completion tokens), heal's training and validation loss
(targets: the completion), and held-out perplexity (targets: every token after the first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from ..errors import InputError
from ..shards import map_batches
from .model import input_device, left_pad, unwrap


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    n_prompt: int  # ids[:n_prompt] is context; the rest are targets (n_prompt >= 1)


@dataclass
class Batch:
    ids: Int[Tensor, "batch seq"]
    attention: Int[Tensor, "batch seq"]
    positions: Int[Tensor, "batch seq"]
    mask: Bool[Tensor, "batch seq"]  # positions whose next token is a target
    index: Int[Tensor, " n"]  # those positions, flattened row-major
    targets: Int[Tensor, " n"]
    rows: Int[Tensor, " n"]


def make_batch(examples: Sequence[Example], pad: int, device: torch.device | str = "cpu") -> Batch:
    if any(not 1 <= e.n_prompt < len(e.ids) for e in examples):
        raise InputError("every example needs 1 <= n_prompt < len(ids): a context token and a target")
    ids, attention, positions = left_pad([e.ids for e in examples], pad, device)
    width = ids.shape[1]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, e in enumerate(examples):
        start = width - len(e.ids)
        mask[row, start + e.n_prompt - 1 : width - 1] = True
    index = mask.flatten().nonzero().squeeze(1)
    shifted = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # next token at each position
    return Batch(ids, attention, positions, mask, index, shifted.flatten()[index], index // width)


def target_logprobs(model: nn.Module, batch: Batch) -> Float[Tensor, "n vocab"]:
    """Log-probs (fp32) at the batch's target positions, computed only there."""
    head = unwrap(model).get_output_embeddings()
    index = batch.index

    def gather(module, args):
        hidden = args[0]
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index.to(hidden.device))  # head may sit elsewhere
        return (picked.unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        out = model(input_ids=batch.ids, attention_mask=batch.attention, position_ids=batch.positions, use_cache=False)
    finally:
        handle.remove()
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    if logits.shape[0] != index.shape[0]:
        raise InputError("the model's output head did not see the gathered positions; unsupported forward")
    return logits.float().log_softmax(-1).to(index.device)  # beside the targets, wherever the head ran


def target_nll(logp: Float[Tensor, "n vocab"], batch: Batch) -> Float[Tensor, " n"]:
    """-log p(target) at every target position."""
    return -logp.gather(1, batch.targets[:, None]).squeeze(1)


@torch.no_grad()
def token_nlls(model: nn.Module, examples: Sequence[Example], pad: int, batch_size: int = 8) -> list[Tensor]:
    """Per example, the NLL of each target token (fp64, CPU), in input order.

    Examples are batched in length order (less padding); the caller's train/eval mode is
    the caller's business.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    device = input_device(model)

    def one(b: int) -> list[Tensor]:
        batch = make_batch([examples[i] for i in batches[b]], pad, device)
        nll = target_nll(target_logprobs(model, batch), batch).double().cpu()
        rows = batch.rows.cpu()
        return [nll[rows == row] for row in range(len(batches[b]))]  # row-major: in token order

    out: list[Tensor] = [torch.empty(0)] * len(examples)
    for chosen, nlls in zip(batches, map_batches(one, len(batches))):
        for i, nll in zip(chosen, nlls):
            out[i] = nll
    return out


def nll_per_example(
    model: nn.Module, examples: Sequence[Example], pad: int, batch_size: int = 8
) -> list[tuple[float, int]]:
    """(summed NLL, number of targets) per example, in input order."""
    return [(float(t.sum()), int(t.numel())) for t in token_nlls(model, examples, pad, batch_size)]


def mean_nll(model: nn.Module, examples: Sequence[Example], pad: int, batch_size: int = 8) -> float:
    """NLL per target token over all examples (token-weighted)."""
    scored = nll_per_example(model, examples, pad, batch_size)
    return sum(t for t, _ in scored) / sum(c for _, c in scored)
