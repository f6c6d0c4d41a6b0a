"""Models: load any Hugging Face causal LM (or the embedded SmolLM2, or a tiny random one) and
reach into it: decoder blocks, chat format, devices and dtypes, and per-token log-probabilities.

- `architecture`: where a model keeps its decoder blocks and residual writers (table, discovery, override);
- `model`: layer specs, chat formatting, encoding, padding, stop tokens, execution devices;
- `loading`: `load_model`, the embedded model's cache, refusing early what cannot work;
- `devices`: `--device` / `--dtype` names and the attention backends the loop runs under;
- `logprobs`: the one engine that scores target tokens (only they reach the output head);
- `tiny`: random tiny models of every supported family with an offline tokenizer.

(`architecture()`, the resolved blocks of a model, stays in `models.architecture`: a
function of the module's own name would hide the module.)
"""

from .architecture import FAMILIES, discover, register_family, set_architecture
from .devices import attention_backends
from .loading import load_model
from .logprobs import Example, make_batch, target_logprobs
from .model import (
    Depth,
    LayerSpec,
    chat_prompt,
    decoder_blocks,
    encode,
    end_of_turn_id,
    hidden_size,
    model_id,
    n_layers,
    resolve_layers,
    stop_token_ids,
)
from .tiny import FAMILY_NAMES, tiny_model, tiny_tokenizer

__all__ = [
    "FAMILIES",
    "FAMILY_NAMES",
    "Depth",
    "Example",
    "LayerSpec",
    "attention_backends",
    "chat_prompt",
    "decoder_blocks",
    "discover",
    "encode",
    "end_of_turn_id",
    "hidden_size",
    "load_model",
    "make_batch",
    "model_id",
    "n_layers",
    "register_family",
    "resolve_layers",
    "set_architecture",
    "stop_token_ids",
    "target_logprobs",
    "tiny_model",
    "tiny_tokenizer",
]
