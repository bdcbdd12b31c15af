"""The GPT-2 model as a list of layers.

The model's shape (`GPTConfig`, `PRESETS`) needs no torch and is imported at
once; the rest is imported on first use, so that reading the config
(`plait prepare` does) does not pay torch's import.
"""

import importlib

from plait.model.shape import PRESETS, GPTConfig

# name -> the module that defines it, imported when the name is first asked for
_LAZY = {
    "Block": "plait.model.gpt",
    "Embedding": "plait.model.gpt",
    "Head": "plait.model.gpt",
    "build_gpt": "plait.model.gpt",
    "count_params": "plait.model.gpt",
    "flops_per_token": "plait.model.gpt",
    "generate": "plait.model.gpt",
    "gpt_loss": "plait.model.gpt",
    "init_gpt_layer": "plait.model.gpt",
    "gpt_init": "plait.model.materialize",
    "is_meta": "plait.model.materialize",
    "materialize": "plait.model.materialize",
}

__all__ = sorted(["PRESETS", "GPTConfig", *_LAZY])


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # found directly from now on
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
