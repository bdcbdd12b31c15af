"""plait's one-process training step against a plain PyTorch loop of the same GPT, on one GPU.

    .venv/bin/python benchmarks/gpu.py [--model gpt2-124m] [--batch 8] [--seq-len 1024] [--vocab 50257]
                                       [--microbatches 1] [--rounds 10] [--warmup 3] [--peak-tflops X]
                                       [--profile N]

Two contenders train the same GPT (GPT-2's 50,257-token vocabulary, bfloat16
autocast, fused AdamW, gradients clipped to norm 1) on random token ids that
already sit on the GPU (no data pipeline):

- plait: `plait.Engine(layers, gpt_loss, None, microbatches=M, autocast_dtype=bfloat16)`,
  then `train_step`, `clip_grad_norm_(1.0)`, the optimizer step and `zero_grad`;
- plain PyTorch, nanoGPT style: `nn.Sequential(*layers)` under `torch.autocast`,
  `backward` (accumulated over the same M micro-batches), `clip_grad_norm_`,
  the optimizer step, `zero_grad`, and one `loss.item()` per step, as plait reads
  its loss once per step.

Both are built in one process and measured in interleaved rounds (one step of
each per round, the order alternating), each after --warmup untimed steps. A
step is timed with CUDA events recorded before and after it (plait.timing's
Clock), and the host waits for the end event only after the step: no
synchronisation is added inside it. The table gives, per contender, the median
step time, tokens/s, the peak memory, plait's step time over the plain loop's,
and MFU = training FLOPs per token x tokens/s / the GPU's dense bfloat16 peak
(the datasheet figure plait.report knows, or --peak-tflops). Below it, the
plait/plain ratio paired round by round, and a check of the timing itself:
three more plait steps with a trace.Recorder attached, whose forward and
backward events of the last step should add up to a little less than that
step's CUDA-event time (the rest is the gradient norm, clipping and the
optimizer).

Peak memory is torch.cuda.max_memory_allocated over a separate, untimed pass
of two steps per contender, each built alone after the timed rounds, so one
contender's tensors never count towards the other's peak.

Without a CUDA device it prints one line to stderr and exits 0. --dry-run-cpu
(for testing the script) runs all of it on the CPU with a tiny model for at
most 2 rounds: its figures measure nothing.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch
from torch import nn

import plait
import plait.report
from plait.config import ModelConfig
from plait.model import PRESETS, build_gpt, count_params, flops_per_token, gpt_loss
from plait.timing import Clock
from plait.trace import Recorder
from plait.train import use_tf32

NO_CUDA = "benchmarks/gpu.py needs a CUDA device; none is visible"
VOCAB = 50257  # GPT-2's BPE vocabulary: the LM head is a real share of the FLOPs, as in training
LR = 1e-4
TRACED_STEPS = 3


def make_plait(gpt, device, microbatches):
    """plait's step; the function carries its engine (for the traced check) as `.engine`."""
    engine = plait.Engine(build_gpt(gpt, seed=0, device=device), gpt_loss, None, microbatches=microbatches,
                          autocast_dtype=torch.bfloat16)
    opt = torch.optim.AdamW(engine.parameters(), lr=LR, fused=True)

    def step(x, y):
        engine.train_step(x, y)  # reads the loss and the gradient norm back: the step's one sync
        engine.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.engine = engine
    return step


def make_plain(gpt, device, microbatches):
    """The same model and update as a plain PyTorch loop (nanoGPT's, without torch.compile)."""
    model = nn.Sequential(*build_gpt(gpt, seed=0, device=device))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)

    def step(x, y):
        loss_sum = 0.0
        for xm, ym in zip(x.chunk(microbatches), y.chunk(microbatches)):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = gpt_loss(model(xm), ym) / microbatches
            loss.backward()
            loss_sum = loss_sum + loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        loss_sum.item()  # one read per step, as plait's train_step does
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


CONTENDERS = {"plait": make_plait, "plain PyTorch": make_plain}


def timed(clock: Clock, step, x, y) -> float:
    """Seconds of one step between marks taken around it (CUDA events on a GPU)."""
    start = clock.mark()
    step(x, y)
    end = clock.mark()
    return clock.seconds(start, end)  # waits for the end event: after the step, never inside it


def run_rounds(gpt, device, args, x, y) -> tuple[dict[str, list[float]], tuple[float, float]]:
    """The timed rounds, then the traced check; returns each contender's step times and
    (F+B event seconds, step seconds) of the last traced step. The contenders die on return."""
    clock = Clock(device)
    steps = {name: make(gpt, device, args.microbatches) for name, make in CONTENDERS.items()}
    for step in steps.values():  # allocator, cuBLAS/cuDNN heuristics, the optimizer's state
        for _ in range(args.warmup):
            step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timed(clock, steps[name], x, y))

    # A check of the clock: the executor's own F and B events of a step, on the same kind of marks.
    recorder = Recorder(set(range(TRACED_STEPS)), clock=clock)
    recorder.align()
    engine = steps["plait"].engine
    engine.executor.recorder = recorder
    traced = []
    for n in range(TRACED_STEPS):
        recorder.step = n
        traced.append(timed(clock, steps["plait"], x, y))
    engine.executor.recorder = None
    if args.profile:
        counts = {name: profile_step(name, step, x, y, device, args.profile) for name, step in steps.items()}
        print_count_differences(counts, args.profile)
    last = TRACED_STEPS - 1
    fb = sum(e.end - e.start for e in recorder.events if e.step == last and e.kind in ("F", "B"))
    return times, (fb, traced[last])


def profile_step(name, step, x, y, device, top: int) -> dict[str, int]:
    """One more step of a contender under torch.profiler: its kernels' count and summed time
    against the step's wall time, and the kernels that take most of it. With --profile: where
    one contender's time goes that the other's does not. Returns how often each aten operator ran."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    clock = Clock(device)
    with profile(activities=activities) as prof:
        seconds = timed(clock, step, x, y)
    kind = DeviceType.CUDA if gpu else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]
    if gpu:  # kernels (and copies, memsets): the GPU's own time
        total = sum(e.self_device_time_total for e in events) / 1e3
        count = sum(e.count for e in events)
        print(f"\n{name}: step {seconds * 1e3:.1f} ms (profiled), {count} kernels taking {total:.1f} ms of it "
              f"(GPU busy {total / (seconds * 1e3):.0%})")
        events.sort(key=lambda e: -e.self_device_time_total)
        for e in events[:top]:
            print(f"  {e.self_device_time_total / 1e3:>8.2f} ms {e.count:>5}x  {e.key[:100]}")
    else:
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        print(f"\n{name}: step {seconds * 1e3:.1f} ms (profiled), operators' self time {total:.1f} ms")
        events.sort(key=lambda e: -e.self_cpu_time_total)
        for e in events[:top]:
            print(f"  {e.self_cpu_time_total / 1e3:>8.2f} ms {e.count:>5}x  {e.key[:100]}")
    return {e.key: e.count for e in prof.key_averages() if e.device_type == DeviceType.CPU and e.key.startswith("aten::")}


def print_count_differences(counts: dict[str, dict[str, int]], top: int) -> None:
    """The aten operators the two contenders call a different number of times in one step."""
    (a, ca), (b, cb) = counts.items()
    diff = sorted(((ca.get(k, 0) - cb.get(k, 0), k) for k in ca.keys() | cb.keys()), key=lambda d: -abs(d[0]))
    print(f"\noperators per step, {a} minus {b} (the {top} largest differences):")
    for d, k in [d for d in diff if d[0]][:top]:
        print(f"  {d:>+6}  {k} ({ca.get(k, 0)} vs {cb.get(k, 0)})")


def peak_memory_mib(make, gpt, device, microbatches, x, y) -> tuple[float, float] | None:
    """(peak MiB over two steps of a contender built alone, MiB allocated before it); None on the CPU."""
    if device.type != "cuda":
        return None
    gc.collect()  # the engine and its executor point at each other: free the last contender now
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step = make(gpt, device, microbatches)
    for _ in range(2):  # the second step runs with the optimizer's state allocated: the steady peak
        step(x, y)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del step
    gc.collect()
    return peak / 2**20, before / 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-124m", choices=tuple(PRESETS), help="size preset")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size (50304: GPT-2's padded to a "
                        "multiple of 64, whose LM-head matmuls take the aligned kernels)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--microbatches", type=int, default=1, help="micro-batches per step (accumulation)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each contender first")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bfloat16 TFLOP/s, for MFU (default: plait's datasheet figure)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the rounds, profile one step of each contender and print its N costliest kernels")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="for testing the script: run it on the CPU with a tiny model, at most 2 rounds")
    args = parser.parse_args()
    if args.dry_run_cpu:
        args.model, args.seq_len, args.batch = "tiny", min(args.seq_len, 64), min(args.batch, 2)
        args.rounds, args.warmup = min(args.rounds, 2), min(args.warmup, 1)
    if min(args.batch, args.seq_len, args.microbatches, args.rounds) < 1 or args.warmup < 0:
        parser.error("--batch, --seq-len, --microbatches and --rounds must be at least 1, --warmup at least 0")
    if args.batch % args.microbatches:
        parser.error(f"--batch {args.batch} does not split into --microbatches {args.microbatches}")
    if args.seq_len > PRESETS[args.model][3]:
        parser.error(f"--seq-len {args.seq_len} is longer than {args.model}'s context of {PRESETS[args.model][3]}")
    return args


def main() -> None:
    args = parse_args()
    if not args.dry_run_cpu and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        sys.exit(0)  # not a failure: CI and curious users on CPU machines land here
    if args.dry_run_cpu:
        torch.set_num_threads(1)  # a check on a shared machine, not a measurement
        device, vocab = torch.device("cpu"), 512
        where = "CPU (--dry-run-cpu: a check of the script; these figures measure nothing)"
    else:
        device, vocab = torch.device("cuda", torch.cuda.current_device()), args.vocab
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    use_tf32(device)  # as `plait train` does; with bfloat16 autocast only float32 leftovers use it
    gpt = ModelConfig(preset=args.model, vocab_multiple=1).gpt(vocab)  # --vocab is the rows: padding is its choice
    flops = flops_per_token(gpt, args.seq_len)
    if args.peak_tflops is not None:
        peak, source = args.peak_tflops * 1e12, "--peak-tflops"
    else:  # (FLOP/s, where from); newer plait gives (None, why) for a GPU it has no figure for
        peak, source = plait.report.peak_flops(device, "bfloat16", 1)
    tokens = args.batch * args.seq_len
    print(f"{where}; torch {torch.__version__}")
    print(f"{args.model}: {gpt.n_layer} layers x {gpt.n_embd}, vocab {vocab}, "
          f"{count_params(build_gpt(gpt, device='meta')) / 1e6:.1f} M parameters, {flops / 1e6:,.0f} MFLOP/token; "
          f"batch {args.batch} x {args.seq_len} tokens in {args.microbatches} micro-batch(es); bfloat16 autocast, "
          f"fused AdamW; {args.rounds} rounds after {args.warmup} warm-up steps each")
    print(f"peak: {f'{peak / 1e12:.3g} TFLOP/s' if peak else 'unknown'} ({source})")

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, vocab, (args.batch, args.seq_len), device=device, generator=g)
    y = torch.roll(x, -1, dims=1)
    times, (fb, traced) = run_rounds(gpt, device, args, x, y)
    # Only measured peaks here: `plait train`'s memory plan (plait.memory) is checked against the
    # allocator's peak by scripts/gpu-check.sh and benchmarks/memory.py, on runs it plans.
    memory = {name: peak_memory_mib(make, gpt, device, args.microbatches, x, y) for name, make in CONTENDERS.items()}

    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\n{'contender':<15}{'step (ms)':>11}{'tokens/s':>12}{'peak mem (MiB)':>16}{'vs plain':>10}   MFU")
    for name, t in med.items():
        mem = f"{memory[name][0]:,.0f}" if memory[name] else "n/a"
        mfu = f"{flops * tokens / t / peak:.1%}" if peak else "unknown peak, give --peak-tflops"
        print(f"{name:<15}{t * 1e3:>11.1f}{tokens / t:>12,.0f}{mem:>16}{t / med['plain PyTorch']:>10.3f}   {mfu}")

    ratios = [a / b for a, b in zip(times["plait"], times["plain PyTorch"])]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    print(f"\nplait/plain paired round by round: median {statistics.median(ratios):.3f} "
          f"(quartiles {q[0]:.3f}-{q[2]:.3f}) over {args.rounds} rounds")
    if memory["plait"]:
        print("peak memory: max_memory_allocated over 2 untimed steps of each contender built alone "
              f"(allocated before: {memory['plait'][1]:,.0f} and {memory['plain PyTorch'][1]:,.0f} MiB)")
    print(f"traced plait step ({TRACED_STEPS} with a trace.Recorder, the last): F+B events {fb * 1e3:.1f} ms, "
          f"step {traced * 1e3:.1f} ms, ratio {fb / traced:.3f} (should be close to 1 and not above)")


if __name__ == "__main__":
    main()
