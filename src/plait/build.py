"""From a Config to this rank's part of the model: the layers, the Engine around them, the optimizer.

The trainer (plait/train.py) calls `build_engine` once in its set-up phase; a test or a
benchmark can call it, or `build_optimizer` on an Engine of its own, to get what training gets.
"""

from __future__ import annotations

import torch

from plait.config import Config
from plait.engine import Engine
from plait.model import build_gpt, count_params, gpt_init, gpt_loss
from plait.parallel.zero import ShardedOptimizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build_optimizer(engine: Engine, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices and embeddings, not on biases and LayerNorm gains.

    Fused (one kernel pass over all tensors) where torch has that kernel: on the CPU
    torch's default is a Python loop over the tensors, three times slower for our GPT,
    and every data-parallel replica repeats the step.
    """
    params = list(engine.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    options = {"lr": cfg.train.lr, "betas": (cfg.train.beta1, cfg.train.beta2), "fused": fused}
    if cfg.parallel.zero >= 1 and engine.grad_sync is not None:  # at dp=1 there is nothing to shard
        return ShardedOptimizer(engine, torch.optim.AdamW, groups, zero=cfg.parallel.zero,
                                overlap_gather=cfg.parallel.overlap_param_gather, **options)
    return torch.optim.AdamW(groups, **options)


def build_engine(cfg: Config, vocab_size: int, mesh, device: torch.device):
    """This rank's part of the model in an Engine, its optimizer, and the whole model's parameter count.

    Called on every rank once the process group and the mesh exist (None in one process).
    """
    gpt = cfg.model.gpt(vocab_size)
    p = cfg.parallel
    # Built on the meta device: the Engine gives memory to this rank's layers only and
    # initialises them from their per-layer seeds (plait.model.materialize), so no rank holds
    # the whole model. The profile partition times real layers, so it builds them all.
    on_meta = p.partition != "profile"
    layers = build_gpt(gpt, seed=cfg.train.seed, device="meta" if on_meta else device)
    dtype = DTYPES[cfg.train.dtype]
    if dtype == torch.float64:
        for layer in layers:
            layer.to(torch.float64)
    micro_rows = cfg.train.global_batch // (p.dp * p.num_microbatches)
    num_params = count_params(layers)  # before the Engine gives this rank's tied copy its own Parameter
    # Seeded after the build: a real build (profile) draws torch's default inits from the global
    # generator and a meta build draws nothing, and dropout must not depend on which ran.
    torch.manual_seed(cfg.train.seed)
    engine = Engine(layers, gpt_loss, mesh, schedule=p.schedule, microbatches=p.num_microbatches,
                    virtual_stages=p.virtual_stages, partition_method=p.partition, split=p.cuts,
                    bucket_mb=p.bucket_mb, activation_checkpointing=cfg.train.activation_checkpointing,
                    autocast_dtype=torch.bfloat16 if dtype == torch.bfloat16 else None,
                    sample_input=torch.zeros(micro_rows, cfg.seq_len, dtype=torch.long, device=device),
                    init=gpt_init(gpt, cfg.train.seed) if on_meta else None, device=device)
    return engine, build_optimizer(engine, cfg), num_params
