"""plait: train GPT-style language models with data and pipeline parallelism.

    import plait
    layers = plait.build_gpt(plait.GPTConfig(vocab_size=2048, block_size=128,
                                             n_layer=4, n_head=4, n_embd=128))
    engine = plait.Engine(layers, plait.gpt_loss, mesh=None, microbatches=4)
    loss = engine.train_step(inputs, targets)
"""

from plait.config import Config, DataConfig, ModelConfig, OutputConfig, ParallelConfig, TrainConfig, load_config
from plait.engine import Engine
from plait.errors import ConfigError, DataError, PlaitError, TrainingError
from plait.model import GPTConfig, build_gpt, gpt_loss

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DataError",
    "Engine",
    "GPTConfig",
    "ModelConfig",
    "OutputConfig",
    "ParallelConfig",
    "PlaitError",
    "TrainConfig",
    "TrainingError",
    "build_gpt",
    "gpt_loss",
    "load_config",
]
