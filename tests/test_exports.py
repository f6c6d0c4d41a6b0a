"""Exports: a run's merged student, a baked-bias checkpoint, adapters naming the real base,
and the llama.cpp control vector; each loads with the plain tool and equals the source."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from steer_heal import SteeringVector
from steer_heal.errors import InputError, ModelMismatch
from steer_heal.models.tiny import tiny_model
from steer_heal.run.export import MARKER, export_adapters, export_baked, export_merged, student

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@torch.no_grad()
def test_merged_checkpoint_loads_plainly_and_equals_the_student(tiny_run, tmp_path):
    out = export_merged(tiny_run, tmp_path / "merged", device="cpu", dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    history, _, _ = student(tiny_run, device="cpu", dtype="float32")
    try:
        assert len(history) == 1
        assert rel(history.model(IDS).logits, plain(IDS).logits) < 1e-5
        with history.base():
            base = history.model(IDS).logits
        assert rel(base, plain(IDS).logits) > 1e-4  # the round changed something
    finally:
        history.close()
    assert json.loads((out / MARKER).read_text())["kind"] == "merged"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp left


def test_an_existing_target_is_refused_and_only_an_export_is_replaced(tiny_run, tmp_path):
    out = export_merged(tiny_run, tmp_path / "merged", device="cpu", dtype="float32")
    with pytest.raises(InputError, match=r"merged exists; pass --overwrite"):
        export_merged(tiny_run, out, device="cpu", dtype="float32")
    export_merged(tiny_run, out, overwrite=True, device="cpu", dtype="float32")
    assert (out / "config.json").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"refusing to replace .*mine: it is not a steer_heal export"):
        export_merged(tiny_run, mine, overwrite=True, device="cpu", dtype="float32")
    assert (mine / "notes.txt").read_text() == "keep me"


@torch.no_grad()
def test_adapters_name_the_real_base_and_load_with_auto_peft(tiny_run, tmp_path):
    from peft import AutoPeftModelForCausalLM

    with pytest.raises(InputError, match=r"tiny-llama is a random model .*--base PATH"):
        export_adapters(tiny_run, tmp_path / "adapters")
    base_dir = tmp_path / "base"
    model, tok = tiny_model("llama")
    model.save_pretrained(base_dir)
    out = export_adapters(tiny_run, tmp_path / "adapters", base=str(base_dir))
    record = json.loads((out / "round_0" / "adapter_config.json").read_text())
    assert record["base_model_name_or_path"] == str(base_dir)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out / "round_0").eval()
    history, _, _ = student(tiny_run, device="cpu", dtype="float32")
    try:
        assert rel(history.model(IDS).logits, peft_model(IDS).logits) < 1e-5
    finally:
        history.close()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@torch.no_grad()
def test_baked_checkpoint_equals_hooks_at_that_coefficient(family, tmp_path):
    model, tok = tiny_model(family)
    generator = torch.Generator().manual_seed(0)
    vec = SteeringVector({1: torch.randn(64, generator=generator), 2: torch.randn(64, generator=generator)}, 64, 4)
    vec = SteeringVector(vec.directions, 64, 4, f"tiny-{family}")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export_baked(model, tok, vec, 1.5, tmp_path / "baked")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is as it was
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with vec.apply(model, 1.5):
        hooked = model(IDS).logits
    assert rel(hooked, plain(IDS).logits) < 1e-5


@pytest.mark.parametrize(
    "family, message",
    [
        ("qwen2", r"a plain qwen2 checkpoint cannot hold a bias on down_proj .*--gguf"),
        ("gemma2", r"cannot bake .*post-norm"),
        ("mixtral", r"cannot bake .*MoE"),
    ],
)
def test_baked_export_refused_before_writing(family, message, tmp_path):
    model, tok = tiny_model(family)
    vec = SteeringVector({1: torch.ones(64)}, 64, 4, f"tiny-{family}")
    with pytest.raises(ValueError, match=message):
        export_baked(model, tok, vec, 1.0, tmp_path / "baked")
    assert list(tmp_path.iterdir()) == []


def test_gguf_round_trip_is_bitwise_and_follows_llama_cpp(tmp_path):
    import gguf

    generator = torch.Generator().manual_seed(0)
    vec = SteeringVector(
        {layer: torch.randn(64, generator=generator) for layer in (1, 2, 3)},
        64,
        4,
        "tiny-llama",
        pos="p",
        neg="n",
        extra={"note": "x"},
    )
    path = vec.to_gguf(tmp_path / "v.gguf")
    back = SteeringVector.from_gguf(path)
    assert back.directions.keys() == vec.directions.keys()
    assert all(torch.equal(back.directions[k], vec.directions[k]) for k in vec.directions)
    assert (back.model_id, back.hidden_size, back.n_layers, back.pos, back.neg, back.extra) == (
        "tiny-llama",
        64,
        4,
        "p",
        "n",
        {"note": "x"},
    )
    reader = gguf.GGUFReader(str(path))
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.2", "direction.3"]
    assert all(np.asarray(t.data).dtype == np.float32 and np.asarray(t.data).shape == (64,) for t in reader.tensors)
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    scaled = SteeringVector.from_gguf(vec.to_gguf(tmp_path / "s.gguf", coeff=2.0))
    assert torch.equal(scaled.directions[2], 2.0 * vec.directions[2])
    assert scaled.extra["gguf_coeff"] == "2.0"


def test_gguf_refuses_layer_zero_and_a_model_of_another_shape(tmp_path):
    vec = SteeringVector({0: torch.ones(64), 1: torch.ones(64)}, 64, 4, "tiny-llama")
    with pytest.raises(ValueError, match=r"no slot for layer 0 .*N >= 1"):
        vec.to_gguf(tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()
    path = SteeringVector({3: torch.ones(64)}, 64, 4, "tiny-llama").to_gguf(tmp_path / "v.gguf")
    wide, _ = tiny_model("llama", hidden=128)
    with pytest.raises(ModelMismatch, match=r"control vector width 64 but the model's hidden size is 128"):
        SteeringVector.from_gguf(path, wide)
    shallow, _ = tiny_model("llama", layers=2)
    with pytest.raises(ModelMismatch, match=r"control vector reaches layer 3 but the model has 2 layers"):
        SteeringVector.from_gguf(path, shallow)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match=r"junk.gguf is not a readable GGUF file"):
        SteeringVector.from_gguf(tmp_path / "junk.gguf")


def test_cli_export_gguf_refuses_an_existing_file(tmp_path):
    from click.testing import CliRunner

    from runners.cli import main

    vec = tmp_path / "v.safetensors"
    SteeringVector({1: torch.ones(64)}, 64, 4, "tiny-llama").save(vec)
    out = tmp_path / "v.gguf"
    first = CliRunner().invoke(main, ["export", "gguf", "--vector", str(vec), "--out", str(out)])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, ["export", "gguf", "--vector", str(vec), "--out", str(out)])
    assert again.exit_code == 1 and "exists; pass --overwrite" in again.output
