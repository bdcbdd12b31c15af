"""The shape of a GPT-2 model, with no torch: what the config and the command line need.

`plait prepare` reads the config tree (plait/config.py), whose model section
checks its preset against `PRESETS`; keeping these two here lets it run without
importing torch (seconds on a small machine). Here and not in plait/model/, whose
package imports the model (and so torch) as it is imported; plait/model/gpt.py builds
the model and names these two as well.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2 model."""

    vocab_size: int
    block_size: int  # the context length: the most positions the model sees
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    tie_embeddings: bool = True  # lm_head shares the token embedding (GPT-2 does)
    layer_norm_eps: float = 1e-5


# name -> (n_layer, n_head, n_embd, block_size). The GPT-2 shapes are OpenAI's.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (4, 4, 128, 128),
    "small": (6, 6, 384, 256),
    "gpt2-124m": (12, 12, 768, 1024),
    "gpt2-350m": (24, 16, 1024, 1024),
    "gpt2-774m": (36, 20, 1280, 1024),
    "gpt2-1.5b": (48, 25, 1600, 1024),
}
