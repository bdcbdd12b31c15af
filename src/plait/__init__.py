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

The names below are imported on first use: `import plait` (and so `plait
prepare`, which never needs torch) does not pay torch's import, seconds on a
small machine, until a name that needs it is used.
"""

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "Config": "plait.config",
    "DataConfig": "plait.config",
    "ModelConfig": "plait.config",
    "OutputConfig": "plait.config",
    "ParallelConfig": "plait.config",
    "TrainConfig": "plait.config",
    "load_config": "plait.config_file",
    "init": "plait.distributed",
    "make_mesh": "plait.distributed",
    "Engine": "plait.engine",
    "ConfigError": "plait.errors",
    "DataError": "plait.errors",
    "PlaitError": "plait.errors",
    "TrainingError": "plait.errors",
    "GPTConfig": "plait.model_shape",
    "build_gpt": "plait.model",
    "gpt_loss": "plait.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # found directly from now on
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
