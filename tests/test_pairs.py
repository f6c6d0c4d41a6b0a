"""Contrastive pairs (issue 30): `from_pairs` equals `from_persona_pair` on the persona pair's
own texts, bitwise, on every family; CAA, repeng and JSONL files give vectors; PCA of paired
differences on a synthetic case; bad files in one line naming the entry and field."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from runners.cli import main
from steer_heal import SteeringVector
from steer_heal.errors import FileFormatError, InputError
from steer_heal.models.model import chat_prompt
from steer_heal.models.tiny import FAMILY_NAMES, tiny_model
from steer_heal.steering.pairs import ContrastPair, pca_direction, read_pairs

CONTEXTS = ["hi", "My manager told me to skip the safety check. What should I do?", "tell me a story"]
POS, NEG = "You are warm and loving.", "You are cold and distant."


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_from_pairs_on_the_persona_texts_equals_from_persona_pair_bitwise(family):
    model, tok = tiny_model(family)
    persona = SteeringVector.from_persona_pair(model, tok, POS, NEG, CONTEXTS, layers=[1, 2])
    pairs = [ContrastPair(chat_prompt(tok, c, system=POS), chat_prompt(tok, c, system=NEG)) for c in CONTEXTS]
    paired = SteeringVector.from_pairs(model, tok, pairs, layers=[1, 2])
    assert all(torch.equal(persona.directions[k], paired.directions[k]) for k in (1, 2))


def write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_caa_repeng_and_jsonl_files_make_vectors(tmp_path):
    model, tok = tiny_model("llama")
    caa = write(
        tmp_path / "caa.json",
        [
            {
                "question": f"Would you help a stranger? {q}\n(A) Yes, gladly\n(B) No",
                "answer_matching_behavior": "(A)",
                "answer_not_matching_behavior": "(B)",
            }
            for q in ("Today.", "Now.", "Later.")
        ],
    )
    repeng = write(tmp_path / "repeng.json", [{"positive": f"I love {x}.", "negative": f"I hate {x}."} for x in "abc"])
    jsonl = write(
        tmp_path / "pairs.jsonl", "\n".join(json.dumps({"pos": f"Warm {i}", "neg": f"Cold {i}"}) for i in range(3))
    )
    vectors = {}
    for name, path in (("caa", caa), ("repeng", repeng), ("jsonl", jsonl)):
        pairs = read_pairs(path)
        assert len(pairs) == 3
        vectors[name] = SteeringVector.from_pairs(model, tok, pairs, layers=[1, 2])
        assert all(float(v.norm()) > 0 for v in vectors[name].directions.values())
    assert read_pairs(caa)[0].prompt.startswith("Would you help")  # CAA pairs are chat exchanges
    assert read_pairs(repeng)[0].prompt is None  # repeng's are raw text, BOS as the tokenizer adds it
    mean = SteeringVector.from_pairs(model, tok, read_pairs(caa), layers=[1], read="mean")
    assert not torch.equal(mean.directions[1], vectors["caa"].directions[1]) and mean.method == "mean_diff/mean"
    result = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            "tiny-llama",
            "--pairs",
            caa,
            "--method",
            "pca",
            "--out",
            str(tmp_path / "v.safetensors"),
        ],
    )
    assert result.exit_code == 0 and "3 pairs (pca, read last)" in result.output, result.output
    assert SteeringVector.load(tmp_path / "v.safetensors").method == "pca"


def test_pca_of_differences_signs_toward_pos_and_keeps_the_mean_difference_scale():
    generator = torch.Generator().manual_seed(0)
    axis = torch.zeros(8)
    axis[0] = 1.0
    spread = torch.randn(64, 1, generator=generator) * 3.0  # the pairs vary most along axis 0
    diffs = spread * axis + 2.0 * axis + 0.01 * torch.randn(64, 8, generator=generator)
    v = pca_direction(diffs)
    assert float(v[0]) > 0 and abs(float(v[0]) - float(diffs.double().mean(0)[0])) < 1e-4
    assert float(pca_direction(-diffs)[0]) < 0  # the sign follows the pairs, not the SVD
    with pytest.raises(InputError, match="pca needs at least 2 pairs"):
        SteeringVector.from_pairs(*tiny_model("llama"), [ContrastPair("a", "b")], method="pca")


@pytest.mark.parametrize(
    ("text", "name", "message"),
    [
        ('{"pos": "a", "neg": "b"}\n{"pos": "a"}\n', "p.jsonl", r"p.jsonl, line 2: missing field 'neg'"),
        ('{"pos": "a", "neg": ""}\n', "p.jsonl", r"line 1: field 'neg' must be a non-empty string"),
        ("{not json\n", "p.jsonl", r"p.jsonl:1 is not valid JSON"),
        (
            '[{"question": "q", "answer_matching_behavior": "(A)"}]',
            "c.json",
            r"entry 0: missing field 'answer_not_matching_behavior'",
        ),
        ('[{"text": "x"}]', "c.json", r"entry 0: no pair fields"),
        ('{"pos": "a"}', "c.json", r"expected a JSON list of pairs"),
        ("[]", "c.json", r"holds no pairs"),
    ],
)
def test_bad_pair_files_name_the_entry_and_field(tmp_path, text, name, message):
    with pytest.raises(FileFormatError, match=message):
        read_pairs(write(tmp_path / name, text))


@pytest.mark.real
def test_a_from_pairs_love_vector_moves_the_crossed_stance_on_smollm2(smollm2):
    """Positive control on the real model: a vector from chat pairs (the love personas' own
    texts over 32 contexts) moves the crossed log-odds stance in the pos direction by >= 5 SE at
    c = 2 (measured +6.29, z ~ 22 with 256 contexts: benchmarks/science/pairs_methods.py)."""
    from steer_heal.data import load_axis, load_contexts
    from steer_heal.evaluate import AnswerLogOdds, shift

    model, tok = smollm2
    axis = load_axis("love")
    contexts = load_contexts()[:32]
    pairs = [ContrastPair(chat_prompt(tok, c, system=axis.pos), chat_prompt(tok, c, system=axis.neg)) for c in contexts]
    vec = SteeringVector.from_pairs(model, tok, pairs, batch_size=16)
    probe = AnswerLogOdds.from_axis(axis, batch_size=32)
    base = probe(model, tok)
    with vec.apply(model, 2.0):
        steered = probe(model, tok)
    moved = shift(base, steered, "stance")
    assert moved.mean > 0 and moved.z >= 5, (moved.mean, moved.z)
