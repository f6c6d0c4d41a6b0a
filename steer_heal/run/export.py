"""Exports: plain files that other tools load without steer_heal.

- `export_merged`: a run's student (the base plus every folded round) as a plain Hugging
  Face checkpoint: standard config, no custom code, loadable with
  `AutoModelForCausalLM.from_pretrained` (and so servable by vLLM as the base family is).
- `export_baked`: a vector at one coefficient folded into the residual writers' biases and
  saved as a plain checkpoint, for families where the fold is exact and the config can
  declare that bias (e.g. Llama's `mlp_bias`; GPT-2, NeoX, Bloom, Falcon, Phi, OPT,
  Starcoder2 have it). Other families are refused with the reason.
- `export_adapters`: a run's round adapters as peft folders whose `base_model_name_or_path`
  is the real base (a hub id or a path), so `AutoPeftModelForCausalLM.from_pretrained`
  finds it. The embedded SmolLM2 has no hub copy of its (dequantised) weights, so its base
  is exported beside the adapters and named by absolute path.
- The llama.cpp control vector: `SteeringVector.to_gguf` (`steer_heal.steering.controlvector`).

Every export is written into a temporary folder beside the target and renamed into place.
An existing target is refused unless `overwrite=True`, and even then only an earlier
export (it carries `steer_heal_export.json`) is replaced: never a folder of something else.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..errors import InputError
from ..healing.adapter import Adapter
from ..healing.history import History
from ..io import atomic_write_text, check_output, fsync_dir, normal_modes, temp_dir
from ..models.architecture import residual_writer, text_config, unwrap
from ..models.loading import SMOLLM2, load_model
from ..steering.vector import SteeringVector
from ..vocab import Number
from .runlog import RunDir

MARKER = "steer_heal_export.json"
_BIAS_FLAGS = ("mlp_bias", "use_bias", "bias", "enable_bias", "add_bias_linear")


def check_target(path: str | os.PathLike, overwrite: bool = False, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an existing target unless `overwrite`, and then only an earlier export; and
    every output `check_output` refuses. Writes nothing."""
    path = check_output(path, inputs)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a folder; choose another export path")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise InputError(f"{path} exists; pass --overwrite (overwrite=True) to replace an earlier export")
        if not (path / MARKER).exists():
            raise InputError(
                f"refusing to replace {path}: it is not a steer_heal export (no {MARKER}); choose another path"
            )
    return path


@contextmanager
def _staged(path: Path, overwrite: bool, record: dict, inputs: tuple = ()) -> Iterator[Path]:
    """A temporary folder beside `path` that becomes `path` when the block ends cleanly."""
    check_target(path, overwrite, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(path.parent, "export", path.name)
    try:
        yield tmp
        atomic_write_text(tmp / MARKER, json.dumps({**record, "version": __version__}, indent=2, sort_keys=True))
        normal_modes(tmp)  # other writers (transformers, peft) may leave 0600 files
        if path.exists():
            old = path.with_name(f".{path.name}.replaced")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _save_plain(model: nn.Module, tok, folder: Path, state: dict | None = None) -> None:
    unwrap(model).save_pretrained(folder, state_dict=state)
    if tok is not None:
        tok.save_pretrained(folder)


def _finished_rounds(run: RunDir) -> list[int]:
    last = run.last_checkpoint()
    return list(range(last + 1)) if last is not None and last >= 0 else []


def student(run_dir: str | os.PathLike, **load) -> tuple[History, object, RunDir]:
    """`(History with every finished round folded, tokenizer, RunDir)` of a run directory
    (read only). `load` goes to `load_model` (device, dtype)."""
    run = RunDir.resume(run_dir, write=False)
    rounds = _finished_rounds(run)
    if not rounds:
        raise InputError(f"{run_dir} has no finished round to export; run it first (steer-heal run --resume)")
    load.setdefault("blocks", run.config.run.blocks or None)
    load.setdefault("writer", run.config.run.writer or None)
    model, tok = load_model(run.config.run.model, **load)
    history = History(model)
    for r in rounds:
        history.fold(Adapter.load(run.round_dir(r) / "adapter"))
    return history, tok, run


def export_merged(run_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False, **load) -> Path:
    """A plain checkpoint of a run's student: W + the sum of its folded rounds' updates."""
    out = check_target(out, overwrite, inputs=(run_dir,))
    history, tok, run = student(run_dir, **load)
    try:
        with _staged(
            out, overwrite, {"kind": "merged", "run": str(Path(run_dir).resolve()), "rounds": len(history)}
        ) as tmp:
            history.export_merged(tmp, tok)
    finally:
        history.close()
    return out


def bias_config(model: nn.Module, vec: SteeringVector) -> tuple[object, dict[str, torch.Size]]:
    """A copy of the model's config that declares a bias on every residual writer the
    vector touches, and the bias keys (with shapes) a model of that config expects but this
    one lacks (saved as zeros). Raises when no config flag of the family can declare the bias."""
    from transformers import AutoModelForCausalLM

    base = unwrap(model)
    names = {id(m): n for n, m in base.named_modules()}
    wanted = [f"{names[id(residual_writer(model, layer))]}.bias" for layer in vec.directions]
    config = base.config.__class__.from_dict(base.config.to_dict())
    have = set(base.state_dict())
    for flag in (None, *_BIAS_FLAGS):
        target = text_config(config)
        if flag is not None:
            if getattr(target, flag, None) is not False:
                continue
            setattr(target, flag, True)
        with torch.device("meta"):
            expected = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
        if all(key in expected for key in wanted):
            missing = {k: shape for k, shape in sorted(expected.items()) if k not in have and k not in wanted}
            if any(not k.endswith(".bias") for k in missing):
                break
            return config, missing
    raise InputError(
        f"a plain {base.config.model_type} checkpoint cannot hold a bias on {wanted[0].rsplit('.', 2)[-2]} (no config "
        "flag declares one), so the baked vector cannot be saved as a standard checkpoint; export the vector with "
        "--gguf, or distil it (steer-heal run) and export the merged student"
    )


def export_baked(
    model: nn.Module,
    tok,
    vec: SteeringVector,
    coeff: Number,
    out: str | os.PathLike,
    overwrite: bool = False,
    allow_other_model: bool = False,
) -> Path:
    """Fold `coeff * v` into the writers' biases and save a plain checkpoint (exact folds only)."""
    out = check_target(out, overwrite)
    vec.check_compatible(model, allow_other_model)
    config, zeros = bias_config(model, vec)  # refuses before anything is written
    base = unwrap(model)
    with (
        vec.bake(model, coeff, allow_other_model),
        _staged(out, overwrite, {"kind": "baked", "coeff": float(coeff), "vector_model": vec.model_id}) as tmp,
    ):
        state = dict(base.state_dict())
        ref = next(iter(state.values()))
        for key, shape in zeros.items():
            state[key] = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
        old = base.config
        base.config = config
        try:
            _save_plain(base, tok, tmp, state)
        finally:
            base.config = old
    return out


def real_base(model_name: str) -> str | None:
    """The base a peft adapter should name: a hub id or an absolute path; None when the
    model has no such home (the embedded SmolLM2, tiny random models)."""
    if model_name == SMOLLM2 or model_name.startswith("tiny-"):
        return None
    local = Path(model_name).expanduser()
    return str(local.resolve()) if local.exists() else model_name


def export_adapters(
    run_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False, base: str | None = None, **load
) -> Path:
    """Each finished round's adapter as `round_N/`, naming the real base. The embedded
    model's base is written to `base/` beside them (its weights exist nowhere else)."""
    out = check_target(out, overwrite, inputs=(run_dir,))
    run = RunDir.resume(run_dir, write=False)
    rounds = _finished_rounds(run)
    if not rounds:
        raise InputError(f"{run_dir} has no finished round to export; run it first")
    name = run.config.run.model
    named = base or real_base(name)
    if named is None and name != SMOLLM2:
        raise InputError(f"{name} is a random model built in-process with no saved base; pass base= (--base PATH)")
    with _staged(out, overwrite, {"kind": "adapters", "run": str(Path(run_dir).resolve()), "rounds": rounds}) as tmp:
        if named is None:  # the embedded model: save its base beside the adapters
            model, tok = load_model(name, **load)
            _save_plain(model, tok, tmp / "base")
            named = str((out / "base").resolve())
        for r in rounds:
            adapter = Adapter.load(run.round_dir(r) / "adapter")
            adapter.config.base_model_name_or_path = named
            adapter.save(tmp / f"round_{r}")
    return out
