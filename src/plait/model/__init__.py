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
)

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
    "gpt_loss",
]
