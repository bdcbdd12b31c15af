"""The training loop, top to bottom.

    plait train                          # the default run
    plait train --model small --steps 500 --global-batch 32
    plait train --resume runs/20261125-101500 --steps 400
    torchrun --nproc-per-node 2 -m plait train --dp 2

One call of `train(cfg)`, on every rank: choose the device (and with it the
backend), join the process group, prepare the data (rank 0 alone looks at
the corpus, cached under --data-dir; the others open its folder memory-mapped),
make the run directory, build the model and the Engine, then for each step
take this rank's share of the global batch (a pure function of seed and step),
run the Engine's step, clip, update, log; evaluate every `eval_every` steps;
checkpoint every `checkpoint_every` steps and at the end; finally draw the
loss curve and sample some text. Only rank 0 prints and writes the run's
files.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from plait import distributed
from plait.checkpoint import (checkpoint_group, restore_training_state,
                              save_training_state, trainer_state)
from plait.faults import maybe_die
from plait.timing import Clock
from plait.trace import Recorder, traced_steps, write_outputs
from plait.config import Config
from plait.data import check_length, get_batch, is_prepared, load_prepared, prepare
from plait.engine import Engine
from plait.parallel.zero import ShardedOptimizer
from plait.errors import ConfigError, TrainingError
from plait.lr import lr_at, plan_of, replan
from plait.model import build_gpt, count_params, flops_per_token, gpt_init, gpt_loss
from plait.report import MetricsLog, peak_flops, plot_loss, plot_throughput, read_metrics, summary_table, throughput
from plait.rundir import open_run_dir, plan_run_dir, restarted, save_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class TrainResult:
    """What a finished run reports back."""

    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    sample: str = ""


def use_tf32(device: torch.device) -> None:
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores.

    PyTorch leaves float32 matmuls in full precision by default: about 67
    TFLOP/s on an H100 SXM, against about 495 (dense) with TF32, whose 10-bit
    mantissa GPT training tolerates (nanoGPT turns it on too). The CPU is
    left as it is.
    """
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of token ids on `device`; on the CPU, the batch itself.

    To a GPU it is copied from pinned memory with non_blocking=True, so the
    host goes on queueing the step instead of waiting for the copy (a
    blocking copy from pageable memory synchronises the stream). The copy is
    queued on the stream the step then runs on, so the step reads it in
    order; torch's pinned-memory allocator keeps the pinned buffer until the
    copy is done.
    """
    if device.type != "cuda":
        return batch
    return batch.pin_memory().to(device, non_blocking=True)


def on_rank0(fn, *args):
    """Run `fn` on rank 0 only and hand its result, or its error, to every rank.

    Used for decisions that must agree everywhere (the run directory); an error
    on rank 0 is raised on all ranks instead of leaving the others waiting.
    """
    result, error = None, None
    if distributed.rank() == 0:
        try:
            result = fn(*args)
        except ConfigError as e:
            error = str(e)
    if dist.is_initialized():
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise ConfigError(error, shared=True)
    return result


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
        return ShardedOptimizer(engine, torch.optim.AdamW, groups, zero=cfg.parallel.zero, **options)
    return torch.optim.AdamW(groups, **options)


def evaluate(engine: Engine, tokens, cfg: Config, device: torch.device, dp_rank: int) -> float:
    """Mean validation loss over `eval_batches` fixed batches of the held-out split."""
    losses = []
    for i in range(cfg.train.eval_batches):
        x, y = get_batch(tokens, cfg.train.seed, i, cfg.train.global_batch, cfg.seq_len,
                         share=dp_rank, num_shares=cfg.parallel.dp)
        losses.append(engine.eval_step(to_device(x, device), to_device(y, device)))
    return sum(losses) / len(losses)


def train(cfg: Config, resume: str | None = None, log=print) -> TrainResult:
    """Train a GPT as `cfg` says; with `resume`, continue that run from its newest checkpoint.

    Called on every rank of the job (torchrun starts them); in a single process
    it needs no launcher. A new run refuses a folder that is not empty, and a
    resume a --steps not past its checkpoint, before writing anything
    (plait/rundir.py).
    """
    # --device decides the device and the backend together ([Note: one device choice]).
    device = distributed.init(device=cfg.train.device, backend=cfg.launch.backend, timeout_s=cfg.parallel.timeout)
    use_tf32(device)
    mesh = distributed.make_mesh(dp=cfg.parallel.dp, pp=cfg.parallel.pp, device_type=device.type)
    ckpt_group = checkpoint_group(cfg.output.checkpoint_timeout)  # collective: every rank, here, once
    rank = distributed.rank()
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    main = rank == 0
    if not main:
        log = lambda *_a, **_k: None  # noqa: E731 - one process speaks for the job
    d = cfg.data
    # Where the run writes and what it resumes from, decided (or refused) before anything is
    # written: see plait/rundir.py. A restarted round (--max-restarts) carries on from its
    # folder's newest checkpoint by itself; with none yet, it starts the run over.
    again = restarted()
    run_dir, start = on_rank0(plan_run_dir, cfg, resume)

    def prepare_data(folder: str | None = None):
        if folder is not None and is_prepared(folder):
            data = load_prepared(folder)
        else:  # rank 0; or a rank on another machine that does not see rank 0's folder
            data = prepare(d.data, d.data_dir, progress=main and cfg.output.progress, **d.prepare_options())
        check_length(data.train, cfg.seq_len, "train")
        check_length(data.val, cfg.seq_len, "validation")
        return data

    # Rank 0 alone looks at the corpus: its fingerprint, and all of its text only when the
    # cache lacks it. The other ranks then open the folder it names, memory-mapped, and
    # read no text.
    folder = on_rank0(lambda: str(prepare_data().dir))
    data = prepare_data(folder)

    on_rank0(open_run_dir, run_dir)

    gpt = cfg.model.gpt(data.tokenizer.vocab_size)
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
    optimizer = build_optimizer(engine, cfg)
    tokens_per_step = cfg.train.global_batch * cfg.seq_len
    flops = flops_per_token(gpt, cfg.seq_len)
    log(f"model: {cfg.model.preset} {gpt.n_layer} layers x {gpt.n_embd} wide, {gpt.n_head} heads, "
        f"vocab {gpt.vocab_size}, {num_params / 1e6:.2f} M parameters, "
        f"{flops / 1e6:.1f} MFLOP per token (training)")
    log(f"data: {data.meta.get('source', d.data)} -> {len(data.train):,} train / {len(data.val):,} val tokens "
        f"({data.tokenizer.kind}); batch {cfg.train.global_batch} x {cfg.seq_len} = {tokens_per_step:,} tokens per step")
    log(f"layout: dp={p.dp} x pp={p.pp} on {distributed.world_size()} process(es), {device.type}; "
        f"global batch {cfg.train.global_batch} = {micro_rows} sequences x {p.num_microbatches} "
        f"micro-batches x {p.dp} replicas")
    if mesh is not None:
        holders = [f"{r}: dp {r % p.dp} stage{'s' if p.virtual_stages > 1 else ''} "
                   f"{','.join(str(st) for st in range(r // p.dp, p.pp * p.virtual_stages, p.pp))}"
                   for r in range(p.world_size)]
        log("ranks: " + "; ".join(holders))
    if p.pp > 1:
        names = ["embedding", *(f"block {i}" for i in range(gpt.n_layer)), "head"]
        log(f"pipeline: {p.schedule}, {p.pp * p.virtual_stages} stages on {p.pp} ranks, cut by {engine.partition.method} "
            f"(share of {p.partition} cost):\n{engine.partition.describe(names)}")

    first_step, anchor = 0, None
    if start is not None:
        first_step = restore_training_state(start, engine, optimizer)
        # Another --steps re-plans the rest of the cosine from here, with no jump (plait/lr.py).
        anchor = replan(trainer_state(start).get("lr_schedule"), first_step, cfg)
        log(f"resumed from {start} at step {first_step}")
    if main:  # only now: a resume refused above records none of its options
        save_config(run_dir, cfg)
    if start is not None:
        keep_until = first_step
    else:
        keep_until = -1 if again else None  # a restart with no checkpoint begins the log again
    metrics = (MetricsLog(run_dir / "metrics.jsonl", resume_step=keep_until,
                          tensorboard=run_dir / "tensorboard" if cfg.output.tensorboard else None)
               if main else None)
    result = TrainResult(run_dir=run_dir, steps=cfg.train.steps)

    recorder = Recorder(traced_steps(cfg.train.steps, cfg.output.trace_steps) if cfg.output.trace else set(),
                        clock=Clock(device))
    if cfg.output.trace:
        recorder.align()
        engine.executor.recorder = recorder

    def checkpoint(step: int) -> None:
        with recorder.span("checkpoint", f"checkpoint {step}"):
            save_training_state(run_dir, step, engine, optimizer, keep=cfg.output.keep_checkpoints,
                                group=ckpt_group, trainer={"lr_schedule": plan_of(cfg, anchor)})

    try:
        if first_step == 0:
            result.val_losses[0] = evaluate(engine, data.val, cfg, device, dp_rank)
            if main:
                metrics.write({"step": 0, "val_loss": result.val_losses[0]})
            log(f"step 0: validation loss {result.val_losses[0]:.4f}")
        bar = tqdm(total=cfg.train.steps, initial=first_step, disable=not (main and cfg.output.progress),
                   unit="step", dynamic_ncols=True, file=sys.stderr)
        for step in range(first_step, cfg.train.steps):
            t0 = time.perf_counter()
            recorder.step = step
            lr = lr_at(step, cfg, anchor)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = get_batch(data.train, cfg.train.seed, step, cfg.train.global_batch, cfg.seq_len,
                             share=dp_rank, num_shares=cfg.parallel.dp)
            loss = engine.train_step(to_device(x, device), to_device(y, device))
            grad_norm = engine.clip_grad_norm_(cfg.train.grad_clip)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise TrainingError(f"step {step + 1}: the loss is {loss} (gradient norm {grad_norm}); "
                                    f"the model diverged, lower --lr (now {cfg.train.lr:g}) or raise --warmup-steps")
            with recorder.span("optimizer", "optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            done = step + 1
            record = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time": dt,
                      "tokens_per_s": tokens_per_step / dt, "tokens": done * tokens_per_step}
            if done == cfg.train.steps or (cfg.train.eval_every and done % cfg.train.eval_every == 0):
                recorder.step = -1  # evaluation is not part of the traced step
                record["val_loss"] = result.val_losses[done] = evaluate(engine, data.val, cfg, device, dp_rank)
                recorder.step = step
            if main:
                metrics.write(record)
            result.losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", lr=f"{lr:.2e}",
                            refresh=False)
            bar.update(1)
            if "val_loss" in record and not cfg.output.progress:
                log(f"step {done}: loss {loss:.4f}, validation loss {record['val_loss']:.4f}")
            if done < cfg.train.steps and cfg.output.checkpoint_every and done % cfg.output.checkpoint_every == 0:
                checkpoint(done)
            maybe_die("after-step", done)
        bar.close()
        if first_step < cfg.train.steps:
            checkpoint(cfg.train.steps)
    finally:
        if metrics is not None:
            metrics.close()
    recorder.step = -1
    events = recorder.gather() if cfg.output.trace else None
    memory = _peak_memory_mib(device)
    # Every rank takes part: the sample runs through the pipeline, each rank with its own layers.
    sample = sample_text(engine, data.tokenizer, cfg, device) if cfg.train.sample_tokens else None
    if not main:
        return result
    trace_stats = None
    if events:
        trace_stats = write_outputs(events, run_dir, engine.schedule, p.dp, p.pp, p.num_microbatches,
                                    p.virtual_stages, {"clock_spread_s": recorder.offset_spread_s,
                                                       "layout": f"dp={p.dp} x pp={p.pp}"})
        log(f"trace: {run_dir / 'trace.json'} and {run_dir / 'pipeline.png'}; step {trace_stats['traced_step']}: "
            f"bubble {trace_stats['bubble_measured']:.3f} measured, {trace_stats['bubble_theory']:.3f} theory")

    records = read_metrics(run_dir / "metrics.jsonl")
    plot_loss(records, run_dir / "loss.png", title=f"plait: {cfg.model.preset}, {cfg.train.steps} steps")
    plot_throughput(records, run_dir / "throughput.png")
    peak, peak_source = peak_flops(device, cfg.train.dtype, distributed.world_size(), cfg.output.peak_tflops)
    if sample is not None:
        result.sample = sample
        (run_dir / "sample.txt").write_text(result.sample)
        log(f"sample:\n{result.sample}")
    # The whole run, read back from metrics.jsonl: after a resume or a restart this process
    # saw only its own steps. The same figures `plait report` prints from the same file.
    step_time, tokens_per_s = throughput(records)
    summary = {
        "steps": cfg.train.steps,
        "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
        "val_loss": {str(r["step"]): r["val_loss"] for r in records if "val_loss" in r},
        "median_step_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "parameters": num_params,
        "flops_per_token": flops,
        "processes": distributed.world_size(),
        "peak_flops": peak,
        "peak_source": peak_source,
        "peak_memory_mib": memory,
        "trace": trace_stats,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log(summary_table(summary, records))
    final_val = summary["val_loss"].get(str(cfg.train.steps))
    log(f"done: {cfg.train.steps} steps, validation loss {final_val:.4f}, run directory {run_dir}"
        if final_val is not None else f"done: run directory {run_dir}")
    return result


def _peak_memory_mib(device: torch.device) -> dict[str, float]:
    """Each rank's peak memory, gathered on every rank: the GPU's allocator peak, or the process's
    largest resident set on the CPU."""
    if device.type == "cuda":
        mine = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    every = [mine]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    return {str(r): m for r, m in enumerate(every)}


def sample_text(engine: Engine, tokenizer, cfg: Config, device: torch.device) -> str:
    """A few tokens of text continued from the prompt, reproducible from the seed.

    Called on every rank: the tokens are generated through the pipeline
    (Engine.generate), so no rank loads the whole model.
    """
    ids = tokenizer.encode(cfg.train.sample_prompt) or [tokenizer.eot_id]
    g = torch.Generator(device=device).manual_seed(cfg.train.seed)
    out = engine.generate(torch.tensor([ids], device=device), cfg.train.sample_tokens,
                          block_size=cfg.model.shape[3], generator=g)
    return tokenizer.decode(out[0].tolist())
