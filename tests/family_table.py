"""What each family's tiny model looks like, written by hand from the transformers source
(not read from steer_heal's table), so the tests check the library against it.

family: (block list path, how a bias fold behaves: "exact" or the reason word bake gives)
"""

EXPECTED = {
    "llama": ("model.layers", "exact"),
    "mistral": ("model.layers", "exact"),
    "qwen2": ("model.layers", "exact"),
    "qwen3": ("model.layers", "exact"),
    "phi3": ("model.layers", "exact"),
    "gemma": ("model.layers", "exact"),
    "gemma2": ("model.layers", "post-norm"),
    "gemma3_text": ("model.layers", "post-norm"),
    "smollm3": ("model.layers", "exact"),
    "olmo": ("model.layers", "exact"),
    "olmo2": ("model.layers", "post-norm"),
    "granite": ("model.layers", "multiplier"),
    "cohere": ("model.layers", "exact"),
    "cohere2": ("model.layers", "exact"),
    "glm4": ("model.layers", "post-norm"),
    "stablelm": ("model.layers", "exact"),
    "starcoder2": ("model.layers", "exact"),
    "phi": ("model.layers", "exact"),
    "qwen2_moe": ("model.layers", "MoE"),
    "qwen3_moe": ("model.layers", "MoE"),
    "mixtral": ("model.layers", "MoE"),
    "gpt_oss": ("model.layers", "MoE"),
    "gpt2": ("transformer.h", "exact"),
    "gpt_neox": ("gpt_neox.layers", "exact"),
    "bloom": ("transformer.h", "exact"),
    "falcon": ("transformer.h", "exact"),
    "opt": ("model.decoder.layers", "exact"),
}
