"""The training loop, top to bottom.

    plait train                          # the default run
    plait train --model small --steps 500 --global-batch 32
    plait train --resume runs/20261125-101500 --steps 400
    torchrun --nproc-per-node 2 -m plait train --dp 2

One call of `train(cfg)`, on every rank, in three phases:
- `set_up`: choose the device (and with it the backend), join the process
  group, prepare the data (rank 0 alone looks at the corpus, cached under
  --data-dir; the others open its folder memory-mapped), make the run
  directory, build the model and the Engine, resume;
- `run_steps`: for each step take this rank's share of the global batch (a
  pure function of seed and step), run the Engine's step, clip, update, log;
  evaluate every `eval_every` steps; checkpoint every `checkpoint_every`
  steps and at the end (written in the background: plait/checkpoint_async.py;
  the next checkpoint and the end of the loop wait for the write in flight);
- `wrap_up`: draw the loss curve, sample some text, write summary.json.
Only rank 0 prints and writes the run's files.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from plait import distributed, memory
from plait.distributed import on_rank0, to_device, use_tf32  # noqa: F401 - use_tf32: part of this module's API
from plait.checkpoint import checkpoint_group, restore_training_state, trainer_state
from plait.checkpoint_async import CheckpointWriter
from plait.faults import maybe_die
from plait.timing import Clock
from plait.trace import Recorder, traced_steps, write_outputs
from plait.config import Config
from plait.data import check_length, get_batch, is_prepared, load_prepared, prepare
from plait.build import build_engine, build_optimizer  # noqa: F401 - build_optimizer: this module's API too
from plait.engine import Engine
from plait.parallel.schedule import rank_stages
from plait.stop import StopSignals, stopped_line
from plait.errors import TrainingError
from plait.lr import lr_at, plan_of, replan
from plait.model import flops_per_token
from plait.report import MetricsLog, peak_flops, plot_loss, plot_throughput, read_metrics, summary_table, throughput
from plait.rundir import open_run_dir, plan_run_dir, restarted, save_config


@dataclass
class TrainResult:
    """What a finished run reports back."""

    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    sample: str = ""
    stopped: str | None = None  # after a graceful stop, its one line (plait/stop.py); None if the run finished


def evaluate(engine: Engine, tokens, cfg: Config, device: torch.device, dp_rank: int) -> float:
    """Mean validation loss over `eval_batches` fixed batches of the held-out split."""
    losses = []
    for i in range(cfg.train.eval_batches):
        x, y = get_batch(tokens, cfg.train.seed, i, cfg.train.global_batch, cfg.seq_len,
                         share=dp_rank, num_shares=cfg.parallel.dp)
        losses.append(engine.eval_step(to_device(x, device), to_device(y, device)))
    return sum(losses) / len(losses)


@dataclass
class Run:
    """What the step loop and the wrap-up need, made by `set_up` on every rank."""

    cfg: Config
    device: torch.device
    dp_rank: int
    main: bool  # rank 0: the one process that prints and writes the run's files
    log: Callable
    run_dir: Path
    data: object  # plait.data.PreparedData
    engine: Engine
    optimizer: torch.optim.Optimizer
    num_params: int
    flops: int
    first_step: int
    anchor: object  # where the cosine was re-planned from on a resume (plait/lr.py), or None
    metrics: MetricsLog | None
    recorder: Recorder
    ckpt_group: object
    memory_plan: list  # of memory.RankPlan, one per rank
    memory_baseline: float  # MiB in use before the model was built: the measured peak is above it
    measured_memory: dict | None = None  # rank -> MiB above the baseline, after the last step
    writer: CheckpointWriter | None = None  # made by __post_init__: writes over ckpt_group

    def __post_init__(self) -> None:
        if self.writer is None:
            self.writer = CheckpointWriter(self.ckpt_group, background=self.cfg.output.async_checkpoint)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch * self.cfg.seq_len

    def checkpoint(self, step: int) -> float:
        """Save the training state after `step` (a collective: every rank calls it); returns the seconds
        the step loop spent here. With --async-checkpoint that is the wait for the previous write, if it
        is still going on, and the staging; the files are written behind (`wait_for_checkpoint`)."""
        t0 = time.perf_counter()
        with self.recorder.span("checkpoint", f"checkpoint {step}"):
            self.writer.save(self.run_dir, step, self.engine, self.optimizer, keep=self.cfg.output.keep_checkpoints,
                             trainer={"lr_schedule": plan_of(self.cfg, self.anchor)})
        return time.perf_counter() - t0

    def wait_for_checkpoint(self) -> None:
        """Block until the checkpoint being written in the background is in place; its failure is
        raised here as one line (TrainingError). The end of the run and a graceful stop call it."""
        self.writer.wait()


def train(cfg: Config, resume: str | None = None, log=print, stops: StopSignals | None = None) -> TrainResult:
    """Train a GPT as `cfg` says; with `resume`, continue that run from its newest checkpoint.

    Called on every rank of the job (torchrun starts them); in a single process
    it needs no launcher. A new run refuses a folder that is not empty, and a
    resume a --steps not past its checkpoint, before writing anything
    (plait/rundir.py).

    `stops` takes this process's stop signals (plait/stop.py; made and installed here if None,
    from the main thread). A stop before the model is built raises StopRequested; after it,
    the run ends at the step every rank agrees on with a checkpoint of it, and the result's
    `stopped` holds the line that says so.
    """
    own = stops is None and threading.current_thread() is threading.main_thread()
    if own:
        stops = StopSignals(cfg.launch.stop_signal).install()
    try:
        if stops is not None:
            stops.raising = True
        run = set_up(cfg, resume, log, stops)
        if stops is not None:
            run.engine.stop_signal = lambda: int(stops.requested or 0)
        result = TrainResult(run_dir=run.run_dir, steps=cfg.train.steps)
        run_steps(run, result)
        if result.stopped is None:
            wrap_up(run, result)
        return result
    finally:
        if stops is not None:
            stops.raising = False
        if own:
            stops.uninstall()


def set_up(cfg: Config, resume: str | None, log, stops: StopSignals | None = None) -> Run:
    """Join the job, prepare the data and the run directory, build the model, and resume if asked.

    A layout predicted to need more than --max-memory-gb is refused first, before any process
    group exists (plait/memory.py).
    """
    if cfg.parallel.max_memory_gb is not None:
        memory.check_fits(cfg, cfg.data.vocab_size, distributed.choose_device(cfg.train.device, cfg.launch.backend))
    # --device decides the device and the backend together ([Note: one device choice]).
    device = distributed.init(device=cfg.train.device, backend=cfg.launch.backend, timeout_s=cfg.parallel.timeout)
    use_tf32(device)
    mesh = distributed.make_mesh(dp=cfg.parallel.dp, pp=cfg.parallel.pp, device_type=device.type)
    ckpt_group = checkpoint_group(cfg.output.checkpoint_timeout)  # collective: every rank, here, once
    main = distributed.rank() == 0
    if not main:
        log = lambda *_a, **_k: None  # noqa: E731 - one process speaks for the job
    # Where the run writes and what it resumes from, decided (or refused) before anything is
    # written: see plait/rundir.py. A restarted round (--max-restarts) carries on from its
    # folder's newest checkpoint by itself; with none yet, it starts the run over.
    again = restarted()
    run_dir, start = on_rank0(plan_run_dir, cfg, resume)
    data = _prepare_data(cfg)
    on_rank0(open_run_dir, run_dir)
    # Planned before the baseline is read: the plan's meta-device build pays torch's one-time cost
    # of meta support (about 70 MiB of modules), which is not the model's memory.
    memory_plan = memory.plan_memory(cfg, data.tokenizer.vocab_size, device.type)
    baseline = memory.baseline_mib(device)
    engine, optimizer, num_params = build_engine(cfg, data.tokenizer.vocab_size, mesh, device)
    flops = flops_per_token(cfg.model.gpt(data.tokenizer.vocab_size), cfg.seq_len)
    _log_layout(cfg, data, engine, mesh, device, num_params, flops, log)
    log(memory.describe_plan(memory_plan))

    first_step, anchor = 0, None
    if start is not None:
        first_step = restore_training_state(start, engine, optimizer)
        # Another --steps re-plans the rest of the cosine from here, with no jump (plait/lr.py).
        anchor = replan(trainer_state(start).get("lr_schedule"), first_step, cfg)
        log(f"resumed from {start} at step {first_step}")
    # From here a stop signal only sets a flag: the step loop acts on it, with a checkpoint
    # (the model exists now), and nothing below is left half-written by an exception.
    if stops is not None:
        stops.raising = False
    if main:  # only now: a resume refused above records none of its options
        save_config(run_dir, cfg)
    if start is not None:
        keep_until = first_step
    else:
        keep_until = -1 if again else None  # a restart with no checkpoint begins the log again
    metrics = (MetricsLog(run_dir / "metrics.jsonl", resume_step=keep_until,
                          tensorboard=run_dir / "tensorboard" if cfg.output.tensorboard else None)
               if main else None)
    recorder = Recorder(traced_steps(cfg.train.steps, cfg.output.trace_steps) if cfg.output.trace else set(),
                        clock=Clock(device))
    if cfg.output.trace:
        recorder.align()
        engine.executor.recorder = recorder
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    return Run(cfg, device, dp_rank, main, log, run_dir, data, engine, optimizer, num_params, flops,
               first_step, anchor, metrics, recorder, ckpt_group, memory_plan, baseline)


def _prepare_data(cfg: Config):
    """The tokenized corpus, checked against the sequence length; rank 0 prepares it (or finds it
    prepared), the others then open its folder."""
    d = cfg.data
    main = distributed.rank() == 0

    def prepare_data(folder: str | None = None):
        if folder is not None and is_prepared(folder):
            data = load_prepared(folder)
        else:  # rank 0; or a rank on another machine that does not see rank 0's folder
            maybe_die("in-prepare", 0)
            data = prepare(d.data, d.data_dir, progress=main and cfg.output.progress, **d.prepare_options())
        check_length(data.train, cfg.seq_len, "train")
        check_length(data.val, cfg.seq_len, "validation")
        return data

    # Rank 0 alone looks at the corpus: its fingerprint, and all of its text only when the
    # cache lacks it. The other ranks then open the folder it names, memory-mapped, and
    # read no text; rank 0 keeps what it opened.
    mine = []

    def on_rank0_prepare() -> str:
        mine.append(prepare_data())
        return str(mine[0].dir)

    folder = on_rank0(on_rank0_prepare)
    return mine[0] if mine else prepare_data(folder)


def _log_layout(cfg: Config, data, engine: Engine, mesh, device: torch.device, num_params: int, flops: int,
                log) -> None:
    """The model, the data, the layout and (with pp > 1) the pipeline's cut, as the run starts."""
    gpt, d, p = cfg.model.gpt(data.tokenizer.vocab_size), cfg.data, cfg.parallel
    micro_rows = cfg.train.global_batch // (p.dp * p.num_microbatches)
    tokens_per_step = cfg.train.global_batch * cfg.seq_len
    log(f"model: {cfg.model.preset} {gpt.n_layer} layers x {gpt.n_embd} wide, {gpt.n_head} heads, "
        f"vocab {data.tokenizer.vocab_size}"
        + (f" (padded to {gpt.vocab_size})" if gpt.vocab_size != data.tokenizer.vocab_size else "")
        + f", {num_params / 1e6:.2f} M parameters, "
        f"{flops / 1e6:.1f} MFLOP per token (training)")
    log(f"data: {data.meta.get('source', d.data)} -> {len(data.train):,} train / {len(data.val):,} val tokens "
        f"({data.tokenizer.kind}); batch {cfg.train.global_batch} x {cfg.seq_len} = {tokens_per_step:,} tokens per step")
    log(f"layout: dp={p.dp} x pp={p.pp} on {distributed.world_size()} process(es), {device.type}; "
        f"global batch {cfg.train.global_batch} = {micro_rows} sequences x {p.num_microbatches} "
        f"micro-batches x {p.dp} replicas")
    if mesh is not None:
        holders = [f"{r}: dp {r % p.dp} stage{'s' if p.virtual_stages > 1 else ''} "
                   f"{','.join(str(st) for st in rank_stages(r // p.dp, p.pp, p.virtual_stages, engine.layout))}"
                   for r in range(p.world_size)]
        log("ranks: " + "; ".join(holders))
    if p.pp > 1:
        names = ["embedding", *(f"block {i}" for i in range(gpt.n_layer)), "head"]
        log(f"pipeline: {p.schedule}, {p.pp * p.virtual_stages} stages on {p.pp} ranks, cut by {engine.partition.method} "
            f"(share of {p.partition} cost):\n{engine.partition.describe(names)}")


def run_steps(run: Run, result: TrainResult) -> None:
    """The step loop, from the first step not yet done (after a resume) to the last, then the final
    checkpoint; validation losses go into `result` as they are made."""
    cfg, engine, optimizer, recorder, metrics, log = run.cfg, run.engine, run.optimizer, run.recorder, run.metrics, run.log
    data, device, dp_rank, main, tokens_per_step = run.data, run.device, run.dp_rank, run.main, run.tokens_per_step
    try:
        if run.first_step == 0:
            result.val_losses[0] = evaluate(engine, data.val, cfg, device, dp_rank)
            if main:
                metrics.write({"step": 0, "val_loss": result.val_losses[0]})
            log(f"step 0: validation loss {result.val_losses[0]:.4f}")
        bar = tqdm(total=cfg.train.steps, initial=run.first_step, disable=not (main and cfg.output.progress),
                   unit="step", dynamic_ncols=True, file=sys.stderr)
        for step in range(run.first_step, cfg.train.steps):
            t0 = time.perf_counter()
            recorder.step = step
            lr = lr_at(step, cfg, run.anchor)
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
            saved = done < cfg.train.steps and cfg.output.checkpoint_every and done % cfg.output.checkpoint_every == 0
            stopping = engine.stop_agreed and done < cfg.train.steps  # every rank read the same ([Note: stop agreement])
            if done == cfg.train.steps:
                # Measured here, before the final checkpoint: the plan is of training, and saving
                # (its host copy, the writer's buffers) is not part of it. A collective: every rank is here.
                run.wait_for_checkpoint()
                run.measured_memory = memory.gather_mib(memory.peak_mib(device) - run.memory_baseline)
            if saved or stopping or done == cfg.train.steps:
                record["checkpoint_stall_s"] = run.checkpoint(done)
            if main:
                metrics.write(record)
            result.losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", lr=f"{lr:.2e}",
                            refresh=False)
            bar.update(1)
            if "val_loss" in record and not cfg.output.progress:
                log(f"step {done}: loss {loss:.4f}, validation loss {record['val_loss']:.4f}")
            maybe_die("after-step", done)
            if stopping:
                name = signal.Signals(engine.stop_agreed).name if engine.stop_agreed > 0 else "stop signals"
                result.stopped = stopped_line(done, name, str(run.run_dir / "checkpoints" / f"step-{done:06d}"),
                                              str(run.run_dir))
                break
        bar.close()
        run.wait_for_checkpoint()  # the last checkpoint, or the stop's, is in place before the run says so
        if result.stopped is None and run.measured_memory is None:  # a restarted round with no step left
            run.measured_memory = memory.gather_mib(memory.peak_mib(device) - run.memory_baseline)
    except BaseException:
        # Failing already (a NaN loss, a lost peer): a write in flight is let finish, so that the
        # checkpoint before it stays the newest, and its own failure is not the one reported.
        run.writer.wait(raising=False)
        raise
    finally:
        if metrics is not None:
            metrics.close()


def wrap_up(run: Run, result: TrainResult) -> None:
    """After the last step: the trace, the charts, the sample and summary.json (rank 0 writes them)."""
    cfg, device, log, run_dir, recorder, p = run.cfg, run.device, run.log, run.run_dir, run.recorder, run.cfg.parallel
    recorder.step = -1
    events = recorder.gather() if cfg.output.trace else None
    peak_memory = memory.gather_mib(memory.peak_mib(device))
    # Every rank takes part: the sample runs through the pipeline, each rank with its own layers.
    sample = sample_text(run.engine, run.data.tokenizer, cfg, device) if cfg.train.sample_tokens else None
    if not run.main:
        return
    trace_stats = None
    if events:
        trace_stats = write_outputs(events, run_dir, run.engine.schedule, p.dp, p.pp, p.num_microbatches,
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
        "parameters": run.num_params,
        "flops_per_token": run.flops,
        "processes": distributed.world_size(),
        "peak_flops": peak,
        "peak_source": peak_source,
        "peak_memory_mib": peak_memory,
        "memory_plan_mib": {str(plan.rank): plan.mib() for plan in run.memory_plan},
        "measured_memory_mib": run.measured_memory,
        "trace": trace_stats,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log(memory.describe_measured(run.memory_plan, run.measured_memory))
    log(summary_table(summary, records))
    final_val = summary["val_loss"].get(str(cfg.train.steps))
    log(f"done: {cfg.train.steps} steps, validation loss {final_val:.4f}, run directory {run_dir}"
        if final_val is not None else f"done: run directory {run_dir}")


def sample_text(engine: Engine, tokenizer, cfg: Config, device: torch.device) -> str:
    """A few tokens of text continued from the prompt, reproducible from the seed.

    Called on every rank: the tokens are generated through the pipeline
    (Engine.generate), so no rank loads the whole model.
    """
    ids = tokenizer.encode(cfg.train.sample_prompt) or [tokenizer.eot_id]
    g = torch.Generator(device=device).manual_seed(cfg.train.seed)
    out = engine.generate(torch.tensor([ids], device=device), cfg.train.sample_tokens,
                          block_size=cfg.model.shape[3], generator=g, vocab=tokenizer.vocab_size)
    return tokenizer.decode(out[0].tolist())
