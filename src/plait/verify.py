"""`plait verify`: a layout next to one process, in float64, for users' own configurations.

The equality every test of ours rests on, offered as a command: a few steps
of the configured layout (dp, pp, schedule, micro-batches, partition, tied
or untied head) on a small seeded float64 copy of the model — the same
number of layers, so the same stages — and the same steps in one process on
the whole batch. Rank 0 prints the largest loss and parameter differences
and a verdict.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from plait import distributed
from plait.config import SECTIONS, Config, flag_of, key_of
from plait.errors import ConfigError
from plait.engine import Engine
from plait.parallel.zero import ShardedOptimizer
from plait.model import GPTConfig, build_gpt, gpt_loss

TOLERANCE = 1e-9
STEPS = 3  # steps compared unless --steps is given on the command line

# [Note: what verify takes from the train options]
# verify honours the layout (--dp --pp --schedule --microbatches --virtual-stages
# --partition uniform|params --split --bucket-mb --timeout and the launch options),
# the layer count (--model, --n-layer), --tie-embeddings, the optimisation that
# the layout could get wrong (--global-batch --lr --beta1 --beta2 --weight-decay
# --grad-clip --seed) and --steps (the steps compared). An option it cannot
# honour, typed on the command line, is refused by name; from a --config file
# (a run's config.toml holds every option) it is listed under the header as not
# used. --device and --backend are checked by `devices`.
_SMALL = "runs its own small copy of the model, 2 heads x 32 wide on 16 tokens"
_NOT_HONOURED = {
    "model.n_head": _SMALL, "model.n_embd": _SMALL, "model.block_size": _SMALL, "train.seq_len": _SMALL,
    "model.dropout": "compares without dropout, whose masks differ from layout to layout",
    "train.dtype": "runs in float64",
    "parallel.partition": "cuts uniformly for --partition profile, whose timings differ from run to run "
                          "(give a run's cut with --split)",
    "train.min_lr_ratio": "keeps --lr constant", "train.warmup_steps": "keeps --lr constant",
    "train.eval_every": "does not evaluate", "train.eval_batches": "does not evaluate",
    "train.sample_tokens": "samples no text", "train.sample_prompt": "samples no text",
    **{f"data.{f.name}": "trains on random tokens, not text" for f in dataclasses.fields(SECTIONS["data"])},
    **{f"output.{f.name}": "writes nothing" for f in dataclasses.fields(SECTIONS["output"]) if f.name != "progress"},
}
_HONOURED_VALUES = {"model.dropout": (0.0,), "train.dtype": ("float64",), "parallel.partition": ("uniform", "params")}


def options(cfg: Config, typed: set[str]) -> tuple[int, list[str]]:
    """(steps to compare, the --config values not used); refuses what the command line asks but verify cannot do.

    `typed` holds the "section.field" names given on the command line
    ([Note: what verify takes from the train options]).
    """
    refused, unused = [], []
    for name, reason in _NOT_HONOURED.items():
        section, attr = name.split(".")
        f = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == attr)
        value = getattr(getattr(cfg, section), attr)
        if value in _HONOURED_VALUES.get(name, ()):
            continue
        where = f"{section}.{key_of(f)} = {value!r}"
        if name in typed:
            refused.append((where, reason, flag_of(f)))
        elif value != f.default:
            unused.append(where)
    if refused:  # one line: the options that share a reason together, then every flag to drop
        reasons: dict[str, list[str]] = {}
        for where, reason, _ in refused:
            reasons.setdefault(reason, []).append(where)
        said = "; ".join(f"{' and '.join(wheres)}: {'plait verify' if i == 0 else 'it'} {reason}"
                         for i, (reason, wheres) in enumerate(reasons.items()))
        flags = [flag for *_, flag in refused]
        flags = " and ".join(filter(None, (", ".join(flags[:-1]), flags[-1])))
        raise ConfigError(f"{said}; drop {flags}", shared=True)
    if "train.steps" in typed:
        return cfg.train.steps, unused
    if cfg.train.steps != Config().train.steps:
        unused.append(f"train.steps = {cfg.train.steps}")
    return STEPS, unused


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


def verify(cfg: Config, steps: int = STEPS, log=print, unused: list[str] = ()) -> int:
    """Run the check on every rank of the job; 0 when the layout matches one process, else 1."""
    device, backend = devices(cfg)
    cpu = distributed.init(device=device, backend=backend, timeout_s=cfg.parallel.timeout)
    p = cfg.parallel
    mesh = distributed.make_mesh(dp=p.dp, pp=p.pp, device_type=cpu.type)  # a CPU mesh, even on a GPU node
    gpt = _small_copy(cfg)
    layers = [layer.double() for layer in build_gpt(gpt, seed=cfg.train.seed)]
    method = "uniform" if p.partition == "profile" else p.partition  # timings would differ run to run
    engine = Engine(layers, gpt_loss, mesh, schedule=p.schedule, microbatches=p.num_microbatches,
                    virtual_stages=p.virtual_stages, partition_method=method, split=p.cuts, bucket_mb=p.bucket_mb,
                    activation_checkpointing=cfg.train.activation_checkpointing)
    if p.zero >= 1 and engine.grad_sync is not None:  # ZeRO: each dp rank steps 1/dp of the state
        t = cfg.train
        opt = ShardedOptimizer(engine, torch.optim.AdamW, lr=t.lr, betas=(t.beta1, t.beta2),
                               weight_decay=t.weight_decay, zero=p.zero)
    else:
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
        verdict[0] = _report(cfg, gpt, steps, losses, parts, log, unused)
    if dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def _report(cfg: Config, gpt: GPTConfig, steps: int, losses, parts, log, unused=()) -> int:
    ref_state, ref_losses = _reference(cfg, gpt, steps)
    p = cfg.parallel
    log(f"plait verify: dp={p.dp} x pp={p.pp}, {p.schedule}, {p.num_microbatches} micro-batches, "
        f"{steps} steps; float64 GPT with {gpt.n_layer} blocks x {gpt.n_embd} wide, "
        f"{'tied' if gpt.tie_embeddings else 'untied'} head, global batch {cfg.train.global_batch}")
    if unused:
        log(f"not used from --config: {', '.join(unused)}")
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
