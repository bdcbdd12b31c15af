"""plait: train GPT-style language models with data and pipeline parallelism.

    import plait, torch
    device = plait.init()                         # torchrun's environment -> process group; cuda:LOCAL_RANK or cpu
    mesh = plait.make_mesh(dp=2, device_type=device.type)  # DeviceMesh, axes "pp" and "dp"
    layers = plait.build_gpt(plait.GPTConfig(vocab_size=2048, block_size=128,
                                             n_layer=4, n_head=4, n_embd=128))
    engine = plait.Engine(layers, plait.gpt_loss, mesh, microbatches=4)
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-3)
    loss = engine.train_step(inputs, targets)     # this rank's share; the global mean loss
    opt.step(); opt.zero_grad()
"""

from plait.config import Config, DataConfig, ModelConfig, OutputConfig, ParallelConfig, TrainConfig
from plait.config_file import load_config
from plait.distributed import init, make_mesh
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
    "init",
    "load_config",
    "make_mesh",
]
