"""One rank of a launch for tests/test_parallel.py: `torchrun --standalone --nproc-per-node 2
tests/helpers/ranks.py CASE OUT`. Each rank writes what it saw to OUT/rank<k>.json (and
safetensors), the test compares them with one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from steer_heal.errors import InputError
from steer_heal.run import parallel
from steer_heal.shards import map_batches, send, sharded


def case_map(where, out: Path) -> dict:
    ran: list[int] = []

    def square(b: int) -> int:
        ran.append(b)
        return b * b

    with sharded(where):
        results = map_batches(square, 5)
        sent = [torch.full((3,), float(where.rank + 1)), torch.full((2,), where.rank + 10, dtype=torch.int64)]
        send(1, sent)  # batch 1 ran on rank 1
    return {"ran": ran, "results": results, "sent": [t.tolist() for t in sent]}


def case_error(where, out: Path) -> dict:
    def fails_on_rank_1(b: int) -> int:
        if b == 3:
            raise InputError(f"batch {b} cannot be computed")
        return b

    try:
        with sharded(where):
            map_batches(fails_on_rank_1, 4)
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None}


def case_heal(where, out: Path, grad_accum: int, joint: bool) -> dict:
    """The same heal in this process alone and spread over the launch; rank 0 saves both adapters.
    `joint`: the student reads each trait and anchor micro-batch in one forward (`joint_anchor`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_heal import completions

    from steer_heal.healing.lora import LoraSettings
    from steer_heal.healing.regularizers import Anchor, KLRev
    from steer_heal.healing.train import TrainSettings, heal
    from steer_heal.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    # three epochs: later epochs read the frozen log-probs kept from their home batches
    # (`steer_heal.healing.frozen`), which a rank that did not run a home batch recomputes
    train = TrainSettings(
        epochs=3, batch_size=2, grad_accum=grad_accum, lr=1e-3, val_frac=0.25, seed=3, joint_anchor=joint
    )
    lora = LoraSettings(r=4, alpha=8, layers=(0.0, 1.0))
    comps = completions(tok, 12)
    anchor = completions(tok, 10)[2:]  # 8 texts, another order than the trait's
    reg = [KLRev(lam=1.0, tau=0.0, agg="rmse"), Anchor(lam=1.0)]
    alone = heal(model, tok, comps, reg, lora=lora, train=train, anchor=anchor)
    with sharded(where):
        spread = heal(model, tok, comps, reg, lora=lora, train=train, anchor=anchor)
    if where.rank == 0:
        save_file({k: v.contiguous() for k, v in alone.adapter.state.items()}, str(out / "alone.safetensors"))
    save_file(
        {k: v.contiguous() for k, v in spread.adapter.state.items()}, str(out / f"spread{where.rank}.safetensors")
    )
    logs = lambda res: [vars(s) for s in res.steps]  # noqa: E731
    return {"alone": logs(alone), "spread": logs(spread), "val": [alone.val_nll_start, spread.val_nll_start]}


def main() -> None:
    case, out = sys.argv[1], Path(sys.argv[2])
    where = parallel.launch()
    assert where is not None, "run me under torchrun"
    if case == "map":
        result = case_map(where, out)
    elif case == "error":
        result = case_error(where, out)
    else:
        accum, _, joint = case.removeprefix("heal").partition("-")  # heal<grad_accum>[-joint]
        result = case_heal(where, out, int(accum), joint == "joint")
    (out / f"rank{where.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
