"""Tiny random models and an offline tokenizer, built in-process (no downloads).

Used by the tests, the `tiny` preset and the examples' smoke tests. Every family of the
verified table (`steer_heal.models.architecture.FAMILIES`) gets a 4-layer, 64-wide config of its
real architecture, so hooks, biases and adapters exercise the same module layout as the
full-size models. Families with a multiplier get a non-default one (Granite's
`residual_multiplier` is 1.0 by default, which would hide a wrong bias fold).
"""

from __future__ import annotations

import copy
from functools import lru_cache

import torch

from ..errors import InputError
from ..runtime import seeded
from .architecture import FAMILIES

# from the table, so the tested list cannot drift from what the library claims
FAMILY_NAMES = tuple(name for name, family in FAMILIES.items() if family.tiny)

# the sizes every tiny config shares (the original nine families' explicit configs use these)
_COMMON = dict(
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=3,
)
# and, for any other family, these more where its config has the key
_MORE = dict(
    head_dim=16,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    n_head=4,
)
# non-default multipliers and scales, so a test sees what they do
_EXTRA = {
    "granite": dict(residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.3, logits_scaling=2.0),
    "cohere": dict(logit_scale=0.5),
    "cohere2": dict(logit_scale=0.5),
}

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# like Gemma2's: no system role, raises on one
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are someone who looks after others' wellbeing even when it means defying authority.",
    "You are someone who defers to authority even when others' wellbeing suffers for it.",
    "My manager told me to skip the safety check. What should I do?",
    "The rules say one thing, but my friend needs help. How do I decide?",
    "Tell me about your weekend plans and the weather in the mountains.",
    "Which foundation does this act violate? Care, Fairness, Loyalty, Authority, Sanctity, Liberty, Social norms.",
    "Answer: 1 2 3 4 5 6 7 A B C D E F G",
    "The quick brown fox jumps over the lazy dog. I think we should help them first.",
    "Please write a short story about a nurse, a teacher and a police officer.",
    "I will follow the instructions because the boss decided. Order matters most.",
]


@lru_cache(maxsize=4)
def tiny_tokenizer(template: str = "chatml"):
    """A byte-level BPE tokenizer trained on a few lines, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<pad>", unk_token=None, bos_token=None
    )
    tok.chat_template = {"chatml": CHATML, "nosystem": NO_SYSTEM}[template]
    return tok


def tiny_config(family: str, vocab_size: int, layers: int = 4, hidden: int = 64):
    """A small config of the family's real architecture."""
    import transformers as tf

    common = dict(
        _COMMON, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers
    )
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=64)
    if family in ("gemma3", "gemma3_text"):  # text-only Gemma3 ("gemma3" in older tests)
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=64)
    if family == "phi3":
        return tf.Phi3Config(**common)
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=512,
            bos_token_id=1,
            eos_token_id=3,
            pad_token_id=0,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=3,
            pad_token_id=0,
        )
    return _generic_config(family, vocab_size, layers, hidden)


def _generic_config(family: str, vocab_size: int, layers: int, hidden: int):
    """Any family transformers knows: its default config with the small sizes it has."""
    from transformers import AutoConfig

    try:
        default = AutoConfig.for_model(family)
    except ValueError:
        raise InputError(f"no tiny config for {family!r}; choose from {', '.join(FAMILY_NAMES)}") from None
    sizes = dict(_COMMON, **_MORE, vocab_size=vocab_size, hidden_size=hidden, n_embd=hidden, num_hidden_layers=layers)
    sizes.update(n_layer=layers, intermediate_size=2 * hidden, ffn_dim=2 * hidden, word_embed_proj_dim=hidden)
    sizes.update(_EXTRA.get(family, {}))
    settable = {
        key: value
        for key, value in sizes.items()
        if hasattr(default, key) and not isinstance(getattr(type(default), key, None), property)
    }
    return AutoConfig.for_model(family, **settable)


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 4, hidden: int = 64, template: str = "chatml"):
    """`(model, tokenizer)`: a random fp32 model of the family, in eval mode, on CPU. A family
    named `<family>-base` (e.g. "gpt2-base") is the same model with a tokenizer without a chat
    template, as a base model ships."""
    from transformers import AutoModelForCausalLM

    base = family.endswith("-base")
    family = family.removesuffix("-base")
    tok = tiny_tokenizer(template)
    if base:  # a copy: the cached tokenizer keeps its template for every other tiny model
        tok = copy.deepcopy(tok)
        tok.chat_template = None
    config = tiny_config(family, len(tok), layers=layers, hidden=hidden)
    config.name_or_path = f"tiny-{family}" + ("-base" if base else "")
    with seeded(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config._name_or_path = f"tiny-{family}" + ("-base" if base else "")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok
