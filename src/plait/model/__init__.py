"""The GPT-2 model as a list of layers."""

from plait.model.gpt import (
    PRESETS,
    Block,
    Embedding,
    GPTConfig,
    Head,
    build_gpt,
    count_params,
    flops_per_token,
    generate,
    gpt_loss,
    init_gpt_layer,
)
from plait.model.materialize import gpt_init, is_meta, materialize

__all__ = [
    "PRESETS",
    "Block",
    "Embedding",
    "GPTConfig",
    "Head",
    "build_gpt",
    "count_params",
    "flops_per_token",
    "generate",
    "gpt_init",
    "gpt_loss",
    "init_gpt_layer",
    "is_meta",
    "materialize",
]
