"""The per-rank memory plan: weights, gradients, optimizer state and activations, before anything runs.

`plan_memory(cfg, vocab_size)` is a pure function of the configuration: the layers are built on
the meta device (no memory), cut into stages as the Engine will cut them, and each rank's bytes
are counted from their parameters and the schedule's micro-batches in flight. `plait train`
prints it at the start, refuses a layout over `--max-memory-gb` before any process group exists
(`check_fits`, with the options that would bring it under), and prints the measured peak beside
it at the end (`peak_mib` less `baseline_mib`, gathered by `gather_mib`).

What is modelled, in bytes, with s the parameters' element size (4 for float32 and for bfloat16
runs, which autocast over float32 parameters; 8 for float64):
- weights: this rank's parameters x s; on a pipeline the tied LM head is a second copy on the
  last stage. Under ZeRO the flat parameter buffer replaces the parameters: no extra copy.
- gradients: the same size (in GradientSync's flat buckets when dp > 1); ZeRO-2 keeps the reduced
  1/dp shard plus one full bucket in flight. At dp=1 ZeRO changes nothing.
- optimizer: AdamW's two tensors per parameter x s; ZeRO >= 1 keeps 1/dp of them.
- activations: what autograd saves per micro-batch (`_layer_activations`, derived from what the
  GPT's layers save, checked against autograd in tests/test_memory.py), times the most
  micro-batches this rank's schedule holds at once (`peak_in_flight`), plus what exists once:
  one block's backward working set, one block recomputed (checkpointing), the loss's softmax
  gradients on the last stage.
- overhead: what the measured figure holds beyond these, calibrated ([Note: overhead]); on CUDA
  also cuBLAS's workspace ([Note: cuBLAS workspace]).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from plait.errors import ConfigError
from plait.parallel.buckets import STAGING_BUFFERS
from plait.parallel.schedule import (V_SCHEDULES, Action, ScheduleError, make_schedule, rank_stages, schedule_layout,
                                     stage_rank)

MIB, GIB = 2**20, 2**30
PARTS = ("weights", "gradients", "optimizer", "activations")

# [Note: overhead] What the measured peak holds beyond the four parts, calibrated on this
# project's CPU runs (2-core x86, torch 2.13, glibc malloc; `tiny` and `small`, one process, dp=2
# with and without ZeRO-1, pp=2: the ratios are in the README's memory section). The resident set
# above the one before the model was built exceeded the parts by about 14 MiB plus 0.55 x the
# activations, fitted on the one-process runs: glibc keeps the micro-batches' freed activations
# and the backward's temporaries in fragmented heaps rather than returning them, and the first
# steps create one-time state (autograd's and oneDNN's caches, gloo's buffers). Checkpointing did
# not shrink that share (measured: `small` with full checkpointing kept it whole), as the forward
# and the recomputation still allocate every activation, if briefly: the share is of the
# activations the layout would keep without checkpointing. (ZeRO once peaked one copy of the
# weights higher still: a separate gradient shard, now a view of the bucket, and the parameters'
# first storage, of which about 70 MiB of gpt2-124m's 331 stays in the process.) CUDA's
# max_memory_allocated counts live tensors only: no share there, a small allowance for the
# optimizer step's temporaries.
# With dp > 1 the CPU figure holds more again, at every ZeRO level: autograd makes each
# parameter's gradient in a block of its own, which GradientSync copies into its bucket and frees
# (each step; each micro-batch at level 2), so a rank's whole gradient passes through the heap
# beside the buckets, and glibc keeps part of it. Measured on gpt2-124m (`make bench-memory`,
# dp=2 and dp=2 x pp=2, each ZeRO level, after the ZeRO all-gather stopped allocating: [Note:
# all-gather on gloo]): 2-114 MiB above the four parts and the share above, mostly 70-110, for
# weights of 166-331 MiB per rank; a quarter of the weights puts every one of those rows within
# 10%. (With glibc's mmap threshold pinned at 1 MiB, which gives such blocks back to the system,
# the excess went away and the step took 15-30% longer: the allocator's choice, not plait's.)
OVERHEAD = {"cpu": (0.55, 14.0, 0.25), "cuda": (0.0, 8.0, 0.0)}  # device -> (share of the activations,
# MiB, share of the weights with dp > 1)

# [Note: cuBLAS workspace] On CUDA the first matmul takes cuBLAS's workspace from PyTorch's
# caching allocator, so max_memory_allocated counts it: 32 MiB on Hopper and later, 8.125 MiB
# before (":4096:2:16:8", in KiB), or what CUBLAS_WORKSPACE_CONFIG says; and cuBLASLt's, 1 MiB
# unless CUBLASLT_WORKSPACE_SIZE (KiB) says otherwise. Measured on an H200 (torch 2.11): +32.0 MiB
# at the first float32 matmul, +1.0 MiB at the first addmm. Without it the plan of `tiny` under
# `plait train --device cuda` was 31% under the allocator's peak (114 MiB against 165).


def cublas_workspace_bytes() -> int:
    """The cuBLAS and cuBLASLt workspaces one process's matmuls allocate ([Note: cuBLAS workspace])."""
    import os

    import torch

    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")
    pairs = [int(v) for v in config.split(":")[1:] if v.isdigit()]
    if config and len(pairs) >= 2:  # ":SIZE:COUNT[:SIZE:COUNT...]", KiB
        kib = sum(size * count for size, count in zip(pairs[::2], pairs[1::2]))
    else:  # a GPU not visible here plans as the current ones do
        major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 9
        kib = 4096 * 8 if major >= 9 else 4096 * 2 + 16 * 8
    lt = os.environ.get("CUBLASLT_WORKSPACE_SIZE", "")
    return (kib + (int(lt) if lt.isdigit() else 1024)) * 1024


@dataclass(frozen=True)
class Layout:
    """What the plan depends on besides the model's shape: one run's layout and batch."""

    dp: int
    pp: int
    schedule: str
    num_microbatches: int
    virtual_stages: int
    partition: str
    cuts: tuple[int, ...] | None
    bucket_mb: float
    zero: int
    checkpointing: str
    micro_rows: int  # sequences per micro-batch
    seq_len: int
    dtype: str
    device: str  # "cpu" or "cuda"
    workspace: int = 0  # bytes the device's libraries allocate once: cuBLAS's on CUDA

    @classmethod
    def of(cls, cfg, device: str = "cpu") -> "Layout":
        """The layout of a plait Config, on `device`."""
        p = cfg.parallel
        return cls(dp=p.dp, pp=p.pp, schedule=p.schedule, num_microbatches=p.num_microbatches,
                   virtual_stages=p.virtual_stages, partition=p.partition,
                   cuts=tuple(p.cuts) if p.cuts is not None else None, bucket_mb=p.bucket_mb, zero=p.zero,
                   checkpointing=cfg.train.activation_checkpointing,
                   micro_rows=cfg.train.global_batch // (p.dp * p.num_microbatches), seq_len=cfg.seq_len,
                   dtype=cfg.train.dtype, device=device,
                   workspace=cublas_workspace_bytes() if device == "cuda" else 0)


@dataclass(frozen=True)
class RankPlan:
    """One rank's predicted peak, in bytes, by part."""

    rank: int
    dp_rank: int
    pp_rank: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    overlap: int = 0  # bytes of gradients and activations that never exist at once (see plan_layout)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead - self.overlap

    @property
    def name(self) -> str:
        return f"rank {self.rank} (dp={self.dp_rank}, pp={self.pp_rank})"

    def mib(self) -> dict[str, float]:
        """The parts and the total in MiB, as summary.json records them."""
        return {k: getattr(self, k) / MIB for k in (*PARTS, "overhead", "overlap", "total")}


def peak_in_flight(actions: list[Action], virtual: int = 1) -> float:
    """The most micro-batches whose activations a rank holds at once: the largest number, over its
    actions in order, of forwards done minus backwards done (a B, or the W of a split backward),
    each counting 1/virtual (a virtual stage holds its share of the rank's layers)."""
    live = top = 0
    for a in actions:
        # An I frees what the forward saved for the input gradient alone, but a deferred W still
        # holds each matmul's input (7 of a block's 16 saved widths, [Note: block activations]) and
        # output gradient (9 more): about what the forward saved, so a micro-batch counts as live,
        # whole, until its W.
        live += {"F": 1, "B": -1, "W": -1}.get(a.kind, 0)
        top = max(top, live)
    return top / virtual


def _sizes(layout: Layout) -> tuple[int, int]:
    """(s, a): the parameters' element size and that of the tensors the matmuls save."""
    s = 8 if layout.dtype == "float64" else 4
    return s, (2 if layout.dtype == "bfloat16" else s)


def _block_bytes(gpt, layout: Layout, mode: str) -> int:
    """What autograd keeps of one Block for one micro-batch, in bytes.

    [Note: block activations] E = b*T*d. Without dropout (the fused attention kernel): the block's
    input and the residual after attention (s each: the residual stream stays in the parameters'
    dtype under autocast), and in the matmul dtype a: ln_1's output, q|k|v (3), the attention
    output, ln_2's output, the MLP's 4d-wide input and GELU output (4 + 4): 2sE + 14aE; plus the
    LayerNorms' mean and rstd (4 x b*T floats) and the attention's log-sum-exp (b*h*T). Autocast
    also keeps a bfloat16 copy of each matmul weight (12 d^2) per micro-batch. With dropout on the
    CPU, attention runs unfused: q, k, v copies (3sE) and three T x T tensors per head (softmax,
    mask, dropped, 3s*b*h*T^2) replace the fused kernel's saves, and each dropout keeps a mask the
    size of its input (a; CUDA's are 1 byte). `full` keeps the input only; `selective` the input
    and the fused attention's output and log-sum-exp (nothing more with dropout on the CPU).
    """
    s, a = _sizes(layout)
    b, T, d, h = layout.micro_rows, layout.seq_len, gpt.n_embd, gpt.n_head
    E, stats, lse = b * T * d, 4 * b * T * s, b * h * T * 4  # the LayerNorms' mean and rstd; log-sum-exp
    unfused = gpt.dropout > 0 and layout.device == "cpu"
    if mode == "full" or (mode == "selective" and unfused):
        return s * E
    if mode == "selective":
        return s * E + a * E + lse
    casts = 2 * 12 * d * d if layout.dtype == "bfloat16" else 0
    if not unfused:
        mask = (1 if layout.device == "cuda" else a) * E if gpt.dropout > 0 else 0
        return 2 * s * E + 14 * a * E + stats + lse + casts + 2 * mask
    # ln_1, y, resid mask, ln_2, fc, gelu, mlp mask in a; q, k, v copies and the T x T tensors in s.
    return 2 * s * E + 13 * a * E + 3 * s * E + 3 * s * b * h * T * T + stats + casts


def _layer_activations(gpt, layout: Layout, kind: str) -> int:
    """Bytes autograd keeps for one micro-batch through one layer of `kind` (embedding, block, head)."""
    s, a = _sizes(layout)
    b, T, d, V = layout.micro_rows, layout.seq_len, gpt.n_embd, gpt.vocab_size
    if kind == "embedding":  # the token ids and positions (int64), and dropout's mask
        return 8 * (b * T + T) + (s * b * T * d if gpt.dropout > 0 else 0)
    if kind == "block":
        return _block_bytes(gpt, layout, layout.checkpointing)
    # The head's input, ln_f's output, the loss's log-softmax over the vocabulary (float32 at least)
    # and the targets; a bfloat16 copy of the LM head's weight under autocast.
    logits = max(s, 4) * b * T * V
    cast = 2 * V * d if layout.dtype == "bfloat16" else 0
    return s * b * T * d + a * b * T * d + 2 * b * T * s + logits + 8 * b * T + cast


def _once_bytes(gpt, layout: Layout, kinds: set[str]) -> int:
    """Activation memory that exists once, not per micro-batch: one block's backward working set
    (the gradients flowing through its 4d-wide MLP and the residual), one block's recomputed
    activations under checkpointing, and the loss's gradient of the log-softmax and of the logits."""
    s, a = _sizes(layout)
    b, T, d = layout.micro_rows, layout.seq_len, gpt.n_embd
    total = 0
    if "block" in kinds:
        total += 8 * a * b * T * d + 2 * s * b * T * d
        if layout.checkpointing != "none":
            total += _block_bytes(gpt, layout, "none")
    if "head" in kinds:
        total += 2 * max(s, 4) * b * T * gpt.vocab_size
    return total


def _stage_layers(gpt, layout: Layout) -> tuple[list[list[int]], list[str], list]:
    """Each stage's layer indices, as the Engine cuts them, each layer's kind, and the (meta) layers.

    Built on the meta device, so nothing is allocated. The "profile" partition times real
    layers, which a plan cannot: it is planned with the "params" cut, which it resembles (a
    layer's time grows with its parameters).
    """
    from plait.model import build_gpt
    from plait.parallel.partition import partition

    layers = build_gpt(gpt, device="meta")
    pp = layout.pp
    virtual = layout.virtual_stages if pp > 1 else 1
    method = "params" if layout.partition == "profile" else layout.partition
    placement = schedule_layout(layout.schedule) if pp > 1 else "loop"
    cut = partition(layers, pp * virtual, method, list(layout.cuts) if layout.cuts else None,
                    ranks=[stage_rank(s, pp, placement) for s in range(pp * virtual)])  # as the Engine cuts
    kinds = ["embedding", *["block"] * gpt.n_layer, "head"]
    return [list(cut.stage_layers(st)) for st in range(cut.num_stages)], kinds, layers


def plan_layout(gpt, layout: Layout) -> list[RankPlan]:
    """Every rank's predicted peak memory for the GPT of shape `gpt` (a GPTConfig) under `layout`.

    Ranks are numbered as plait lays them out: rank = pp_rank * dp + dp_rank.
    """
    stages, kinds, layers = _stage_layers(gpt, layout)
    s, _ = _sizes(layout)
    pp, dp = layout.pp, layout.dp
    schedule, virtual = (layout.schedule, layout.virtual_stages) if pp > 1 else ("1f1b", 1)
    actions = make_schedule(schedule, pp, layout.num_microbatches, virtual)
    placement = schedule_layout(schedule)  # zbv's (and dualpipev's) V puts stages r and 2pp-1-r on rank r
    plans = []
    for pp_rank in range(pp):
        held = [j for st in rank_stages(pp_rank, pp, virtual, placement) for j in stages[st]]
        # A tied weight is one Parameter within a rank; a pipeline's last rank holds its own copy.
        params = {id(p): p.numel() for j in held for p in layers[j].parameters()}
        weights = s * sum(params.values())
        gradients, optimizer = weights, 2 * weights
        if dp > 1 and layout.zero >= 1:
            optimizer = optimizer // dp
        if dp > 1 and layout.zero >= 2:
            gradients = weights // dp + min(STAGING_BUFFERS * int(layout.bucket_mb * MIB), weights)
        in_flight = peak_in_flight(actions[pp_rank], virtual)

        def activations_of(lay: Layout) -> int:
            per_mb = sum(_layer_activations(gpt, lay, kinds[j]) for j in held)
            return int(per_mb * in_flight) + _once_bytes(gpt, lay, {kinds[j] for j in held})

        activations = activations_of(layout)
        # At dp=1 the gradients are autograd's own, made by the backward as it frees the activations
        # of the micro-batch it runs (and freed by zero_grad): the last micro-batch's activations and
        # the gradients never exist in full at once. With dp > 1 they live in GradientSync's buckets
        # from the start. (Measured: gpt2-124m at seq 512 planned 27% high without this.)
        per_mb = sum(_layer_activations(gpt, layout, kinds[j]) for j in held)
        overlap = min(int(per_mb * min(in_flight, 1.0)), gradients) if dp == 1 else 0
        share, fixed, churn = OVERHEAD.get(layout.device, OVERHEAD["cpu"])  # [Note: overhead]
        overhead = int(share * activations_of(dataclasses.replace(layout, checkpointing="none")) + fixed * MIB
                       + (churn * weights if dp > 1 else 0) + layout.workspace)
        for dp_rank in range(dp):
            plans.append(RankPlan(pp_rank * dp + dp_rank, dp_rank, pp_rank, weights, gradients, optimizer,
                                  activations, overhead, overlap))
    return plans


def plan_memory(cfg, vocab_size: int, device: str = "cpu") -> list[RankPlan]:
    """Every rank's predicted peak memory for a plait Config with this vocabulary, on `device`."""
    return plan_layout(cfg.model.gpt(vocab_size), Layout.of(cfg, device))


def describe_plan(plans: list[RankPlan]) -> str:
    """The plan as `plait train` prints it: one line per rank, in MiB."""
    lines = [f"{p.name} {p.total / MIB:.0f} = " + " + ".join(f"{k} {getattr(p, k) / MIB:.0f}"
                                                              for k in (*PARTS, "overhead"))
             + (f" - {p.overlap / MIB:.0f} (gradients made as activations are freed)" if p.overlap else "")
             for p in plans]
    return "memory plan (MiB): " + ";\n  ".join(lines)


def describe_measured(plans: list[RankPlan], measured: dict[str, float]) -> str:
    """The measured peak of each rank beside its plan, as `plait train` prints it at the end."""
    rows = []
    for p in plans:
        got, want = measured[str(p.rank)], p.total / MIB
        rows.append(f"{p.name} measured {got:.0f} MiB, planned {want:.0f} ({(want - got) / got * 100:+.1f}%)"
                    if got > 0 else f"{p.name} measured {got:.0f} MiB, planned {want:.0f}")
    return "memory: " + "; ".join(rows)


def _peak(plans: list[RankPlan]) -> RankPlan:
    return max(plans, key=lambda p: p.total)


def _gb(n: int) -> str:
    return f"{n / GIB:.2f}"


def _zero_levels() -> tuple[int, ...]:
    """The ZeRO levels the config accepts (the plan itself models 0, 1 and 2)."""
    from plait.config import ParallelConfig

    field = next(f for f in dataclasses.fields(ParallelConfig) if f.name == "zero")
    return tuple(field.metadata["choices"])


def _options(gpt, layout: Layout) -> list[tuple[str, Layout]]:
    """Each single change that lowers memory, with the layout it gives, least intrusive first."""
    options = []
    most_stages = gpt.n_layer + 2
    virtual = layout.virtual_stages if layout.schedule in ("interleaved-1f1b", *V_SCHEDULES) else 1
    for pp in range(layout.pp + 1, most_stages // virtual + 1):
        if layout.schedule == "interleaved-1f1b" and layout.num_microbatches % pp:
            continue
        options.append((f"--pp {pp}", dataclasses.replace(layout, pp=pp, cuts=None)))
    if layout.dp > 1:
        for level in _zero_levels():
            if level > layout.zero:
                options.append((f"--zero {level}", dataclasses.replace(layout, zero=level)))
    order = ("none", "selective", "full")
    for mode in order[order.index(layout.checkpointing) + 1:]:
        options.append((f"--activation-checkpointing {mode}", dataclasses.replace(layout, checkpointing=mode)))
    rows = layout.micro_rows * layout.num_microbatches  # this replica's share of the batch
    for m in range(layout.num_microbatches + 1, rows + 1):
        if rows % m == 0 and not (layout.schedule == "interleaved-1f1b" and m % layout.pp):
            per = rows // m
            options.append((f"--microbatches {m} ({per} sequence{'s' if per > 1 else ''} per micro-batch)",
                            dataclasses.replace(layout, num_microbatches=m, micro_rows=per)))
    return options


def check_fits(cfg, vocab_size: int, device: str = "cpu") -> list[RankPlan]:
    """The plan, or a ConfigError if a rank is predicted to need more than `--max-memory-gb`.

    The message names the fullest rank and its parts, and the options that would each bring the
    prediction under the limit (each evaluated with this plan); if none alone does, all of them
    together, or the memory it would need even then.
    """
    gpt, layout = cfg.model.gpt(vocab_size), Layout.of(cfg, device)
    plans = plan_layout(gpt, layout)
    limit_gb = cfg.parallel.max_memory_gb
    if limit_gb is None:
        return plans
    limit = limit_gb * GIB
    top = _peak(plans)
    if top.total <= limit:
        return plans
    head = (f"parallel.max_memory_gb = {limit_gb:g}: {top.name} is predicted to peak at {_gb(top.total)} GB "
            f"(weights {_gb(top.weights)}, gradients {_gb(top.gradients)}, optimizer {_gb(top.optimizer)}, "
            f"activations {_gb(top.activations)}, overhead {_gb(top.overhead)}"
            + (f", less {_gb(top.overlap)} of gradients made as activations are freed" if top.overlap else "") + ")")
    options = _options(gpt, layout)
    # The first fitting choice of each kind: the smallest pp, the lowest ZeRO level, ...
    fits, kinds = [], set()
    for text, other in options:
        kind = text.split()[0]
        if kind not in kinds and _peak(plan_layout(gpt, other)).total <= limit:
            fits.append(text)
            kinds.add(kind)
    if fits:
        return _refuse(f"{head}; try {_either(fits, 'or')}")
    furthest = {text.split()[0]: (text, other) for text, other in options}  # the last of each kind
    if not furthest:
        return _refuse(f"{head}; no option of plait lowers it; it needs {_gb(top.total)} GB")
    every = layout
    for _, other in furthest.values():  # the kinds change disjoint fields: fold them together
        every = dataclasses.replace(every, **{f.name: getattr(other, f.name) for f in dataclasses.fields(other)
                                              if getattr(other, f.name) != getattr(layout, f.name)})
    try:
        least = _peak(plan_layout(gpt, every)).total
    except ScheduleError:  # interleaved: the most micro-batches need not be a multiple of the most pp
        furthest.pop("--microbatches")
        every = dataclasses.replace(every, num_microbatches=layout.num_microbatches, micro_rows=layout.micro_rows)
        least = _peak(plan_layout(gpt, every)).total
    together = _either([text for text, _ in furthest.values()], "and")
    if least <= limit:
        return _refuse(f"{head}; try them together: {together}")
    return _refuse(f"{head}; it cannot fit in {limit_gb:g} GB even with {together}; "
                   f"it needs at least {_gb(least)} GB")


def _either(items: list[str], word: str) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {word} {items[-1]}"


def _refuse(message: str):
    raise ConfigError(message, shared=True)


def resident_mib() -> float:
    """This process's resident memory now, in MiB (VmRSS from /proc; 0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return 0.0


def baseline_mib(device) -> float:
    """What the measured peak is taken above: the GPU memory allocated now, or the resident set."""
    import torch

    return torch.cuda.memory_allocated(device) / MIB if device.type == "cuda" else resident_mib()


def peak_mib(device) -> float:
    """This process's peak so far, in MiB: the GPU allocator's on CUDA, the largest resident set
    on the CPU (ru_maxrss, KiB on Linux)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gather_mib(mine: float) -> dict[str, float]:
    """One figure per rank, gathered on every rank (a collective when there is a process group)."""
    import torch.distributed as dist

    every = [mine]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    return {str(r): m for r, m in enumerate(every)}
