"""`plait verify`: a layout next to one process, in float64, for users' own configurations.

The equality every test of ours rests on, offered as a command: a few steps
of the configured layout (dp, pp, schedule, micro-batches, partition, tied
or untied head) on a small seeded float64 copy of the model — the same
number of layers, so the same stages — and the same steps in one process on
the whole batch. Rank 0 prints the largest loss and parameter differences
and a verdict.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from plait import distributed
from plait.config import Config
from plait.errors import ConfigError
from plait.engine import Engine
from plait.model import GPTConfig, build_gpt, gpt_loss

TOLERANCE = 1e-9


def _small_copy(cfg: Config) -> GPTConfig:
    n_layer = cfg.model.shape[0]
    return GPTConfig(vocab_size=257, block_size=16, n_layer=n_layer, n_head=2, n_embd=32,
                     tie_embeddings=cfg.model.tie_embeddings)


def _batch(step: int, rows: int, gpt: GPTConfig):
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randint(0, gpt.vocab_size, (rows, gpt.block_size), generator=g)
    return x, torch.roll(x, -1, dims=1)


def _optimizer(params, cfg: Config):
    t = cfg.train
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)


def _reference(cfg: Config, gpt: GPTConfig, steps: int):
    model = nn.Sequential(*[layer.double() for layer in build_gpt(gpt, seed=cfg.train.seed)])
    opt = _optimizer(model.parameters(), cfg)
    losses = []
    for step in range(steps):
        x, y = _batch(step, cfg.train.global_batch, gpt)
        loss = gpt_loss(model(x), y)
        loss.backward()
        if cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.state_dict(), losses


def devices(cfg: Config) -> tuple[str, str]:
    """(device, backend) of a verify run: always the CPU and gloo, in float64, even on a GPU node.

    The reference is one CPU process in float64, and the comparison is to
    1e-9, so the layout runs there too. A user who asks for cuda or nccl
    would think that path checked: refused, rather than silently ignored.
    """
    asked = [(name, flag) for name, flag, given in (
        ("train.device = 'cuda'", "--device cuda", cfg.train.device == "cuda"),
        ("launch.backend = 'nccl'", "--backend nccl", cfg.launch.backend == "nccl")) if given]
    if asked:
        raise ConfigError(f"{' and '.join(f for f, _ in asked)}: plait verify runs on the CPU with gloo, "
                          f"in float64; drop {' and '.join(f for _, f in asked)}", shared=True)
    return "cpu", "gloo"


def verify(cfg: Config, steps: int = 3, log=print) -> int:
    """Run the check on every rank of the job; 0 when the layout matches one process, else 1."""
    device, backend = devices(cfg)
    cpu = distributed.init(device=device, backend=backend, timeout_s=cfg.parallel.timeout)
    p = cfg.parallel
    mesh = distributed.make_mesh(dp=p.dp, pp=p.pp, device_type=cpu.type)  # a CPU mesh, even on a GPU node
    gpt = _small_copy(cfg)
    layers = [layer.double() for layer in build_gpt(gpt, seed=cfg.train.seed)]
    method = "uniform" if p.partition == "profile" else p.partition  # timings would differ run to run
    engine = Engine(layers, gpt_loss, mesh, schedule=p.schedule, microbatches=p.num_microbatches,
                    virtual_stages=p.virtual_stages, partition_method=method, split=p.cuts, bucket_mb=p.bucket_mb)
    opt = _optimizer(engine.parameters(), cfg)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    share = cfg.train.global_batch // p.dp
    losses = []
    for step in range(steps):
        x, y = _batch(step, cfg.train.global_batch, gpt)
        losses.append(engine.train_step(x[dp_rank * share:(dp_rank + 1) * share],
                                        y[dp_rank * share:(dp_rank + 1) * share]))
        engine.clip_grad_norm_(cfg.train.grad_clip)
        opt.step()
        opt.zero_grad()
    mine = {k: v.detach().cpu() for k, v in engine.state_dict().items()}
    parts = [mine]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    verdict = [1]
    if distributed.rank() == 0:
        verdict[0] = _report(cfg, gpt, steps, losses, parts, log)
    if dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def _report(cfg: Config, gpt: GPTConfig, steps: int, losses, parts, log) -> int:
    ref_state, ref_losses = _reference(cfg, gpt, steps)
    p = cfg.parallel
    log(f"plait verify: dp={p.dp} x pp={p.pp}, {p.schedule}, {p.num_microbatches} micro-batches, "
        f"{steps} steps; float64 GPT with {gpt.n_layer} blocks x {gpt.n_embd} wide, "
        f"{'tied' if gpt.tie_embeddings else 'untied'} head, global batch {cfg.train.global_batch}")
    log(f"{'step':>4}  {'loss (layout)':>22}  {'loss (one process)':>22}  {'|diff|':>8}")
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        log(f"{i + 1:>4}  {a:>22.15f}  {b:>22.15f}  {abs(a - b):>8.1e}")
    worst_key, worst, identical = None, 0.0, True
    seen: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, value in part.items():
            if key in seen and not torch.equal(seen[key], value):
                identical = False  # replicas (or tied copies) drifted apart
            seen[key] = value
            diff = (value - ref_state[key]).abs().max().item()
            if diff >= worst:
                worst_key, worst = key, diff
    missing = set(ref_state) - set(seen)
    loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
    log(f"largest parameter difference {worst:.1e} ({worst_key}); largest loss difference {loss_diff:.1e}; "
        f"copies of each parameter identical: {'yes' if identical else 'NO'}"
        + (f"; MISSING {sorted(missing)}" if missing else ""))
    ok = worst <= TOLERANCE and loss_diff <= TOLERANCE and identical and not missing
    log(f"verdict: {'PASS' if ok else 'FAIL'} (tolerance {TOLERANCE:g})")
    return 0 if ok else 1
