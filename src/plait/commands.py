"""The commands of `plait` that read no config tree: `export`, `report` and `schedule`.

Each takes the parsed arguments (plait.cli builds the parser and dispatches) and returns the exit
code; bad input raises ConfigError, which plait.cli turns into one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from plait.errors import ConfigError, say


def export(args: argparse.Namespace) -> int:
    """`plait export`: the run's newest checkpoint as one safetensors file or a Hugging Face folder."""
    from plait.export import export_hf, export_safetensors  # torch is paid for only once the input is good

    if args.format == "hf":
        out = export_hf(args.run_dir, args.out, log=lambda note: say(f"plait: note: {note}"), force=args.force)
        files = ", ".join(sorted(p.name for p in out.iterdir()))
        print(f"wrote Hugging Face GPT-2 folder {out} ({files})")
    else:
        out = export_safetensors(args.run_dir, args.out, force=args.force)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; read it with plait.export.load_exported)")
    return 0


def report(args: argparse.Namespace) -> int:
    """`plait report`: a finished run's summary table, and its loss and throughput charts redrawn."""
    from plait.report import given_peak, plot_loss, plot_throughput, read_metrics, summary_table

    if args.peak_tflops is not None:
        check_number("--peak-tflops", args.peak_tflops, 0, above=True)
    run = Path(args.run_dir)
    if not (run / "summary.json").is_file() or not (run / "metrics.jsonl").is_file():
        raise ConfigError(f"{run}: no summary.json and metrics.jsonl there; give the directory of a finished plait run")
    import json

    summary = json.loads((run / "summary.json").read_text())
    records = read_metrics(run / "metrics.jsonl")
    if args.peak_tflops is not None:
        # Runs from before "processes" was recorded: one peak-memory entry per rank.
        processes = summary.get("processes") or len(summary.get("peak_memory_mib") or {}) or 1
        summary["peak_flops"], summary["peak_source"] = given_peak(args.peak_tflops, processes)
    print(f"run {run}: {summary['steps']} steps, {summary['parameters'] / 1e6:.2f} M parameters, "
          f"{summary['flops_per_token'] / 1e6:.1f} MFLOP per token")
    print(summary_table(summary, records))
    plot_loss(records, run / "loss.png")
    plot_throughput(records, run / "throughput.png")
    print(f"wrote {run / 'loss.png'} and {run / 'throughput.png'}")
    return 0


def check_number(flag: str, value: float, lo: float, above: bool = False) -> None:
    """A number option of a command outside the config tree: finite and in range, or one line."""
    bound = f"> {lo:g}" if above else f">= {lo:g}"
    if not math.isfinite(value) or value < lo or (above and value == lo):
        raise ConfigError(f"{flag} must be {'a finite number ' if isinstance(value, float) else ''}{bound} "
                          f"(got {value:g})")


def _schedule_flags(message: str) -> str:
    """A schedule library message in `plait schedule`'s option names: pp -> --stages, virtual -> --virtual-stages."""
    for word, flag in ((r"\bpp\b", "--stages"), (r"\bvirtual\b", "--virtual-stages"),
                       (r"\bnum_microbatches\b|\bmicro-batches\b", "--microbatches")):
        message = re.sub(word, flag, message)
    return message


def schedule(args: argparse.Namespace) -> int:
    """`plait schedule`: simulate, print the grid and the figures, optionally draw the chart."""
    from plait.parallel.schedule import (V_SCHEDULES, ScheduleError, format_grid, make_schedule, schedule_layout,
                                         simulate, theoretical_bubble)

    if args.virtual is None:
        args.virtual = 2 if args.name in V_SCHEDULES else 1  # a V is two stages per rank, nothing else
    for flag, value in (("--stages", args.stages), ("--microbatches", args.microbatches),
                        ("--virtual-stages", args.virtual)):
        check_number(flag, value, 1)
    check_number("--forward-cost", args.forward_cost, 0, above=True)
    check_number("--backward-cost", args.backward_cost, 0, above=True)
    input_cost = args.backward_cost / 2 if args.input_cost is None else args.input_cost
    weight_cost = args.backward_cost / 2 if args.weight_cost is None else args.weight_cost
    check_number("--input-cost", input_cost, 0, above=True)
    check_number("--weight-cost", weight_cost, 0, above=True)
    check_number("--comm-cost", args.comm_cost, 0)
    if args.out and Path(args.out).exists() and not args.force:
        raise ConfigError(f"--out {args.out} exists; give --force to replace it, or a new file name")
    try:
        plan = make_schedule(args.name, args.stages, args.microbatches, args.virtual)
        layout = schedule_layout(args.name)
        # Costs are per rank, so a chart of an interleaved layout has the same
        # work as its plain 1f1b one and the makespans compare directly.
        v = args.virtual
        split = any(a.kind == "I" for acts in plan.values() for a in acts)
        # A split schedule's B (stage 0's: zero_bubble.whole_first_stage) costs its I and W.
        backward = input_cost + weight_cost if split else args.backward_cost
        sim = simulate(plan, args.stages, args.microbatches, v, args.forward_cost / v, backward / v,
                       args.comm_cost, input_cost=input_cost / v, weight_cost=weight_cost / v, layout=layout)
        theory = theoretical_bubble(args.name, args.stages, args.microbatches, args.virtual)
    except ScheduleError as e:
        # Only the summary: a grid, if any, would bury the fix-it line. The library names
        # its arguments; the message names this command's options.
        raise ConfigError(_schedule_flags(str(e).splitlines()[0])) from None
    shape = (f"{args.stages} stages" + (f" x {args.virtual} virtual" if args.virtual > 1 else "")
             + (" in a V" if layout == "v" else ""))
    costs = (f"input {input_cost:g}, weight {weight_cost:g}" if split else f"backward {args.backward_cost:g}")
    print(f"{args.name}: {shape}, {args.microbatches} micro-batches "
          f"(per rank: forward {args.forward_cost:g}, {costs}; comm {args.comm_cost:g})")
    print(format_grid(plan))
    print(f"makespan            {sim.makespan:g}")
    print(f"bubble (simulated)  {sim.bubble:.4f}")
    print(f"bubble (theory)     {theory:.4f}")
    awaiting = "their weight gradients" if split else "their backward"
    # The simulator counts (stage, micro-batch) pairs; a rank's stage holds 1/v of its layers.
    share = f"; each of a rank's {v} stages counts 1/{v}" if v > 1 else ""
    print(f"peak micro-batches in flight per rank (forwards awaiting {awaiting}{share}): "
          + " ".join(f"{sim.peak_in_flight[r] / v:g}" for r in sorted(plan)))
    if args.out:
        from plait.charts import boxes_from_simulation, draw_pipeline

        title = (f"{args.name}, {shape}, {args.microbatches} micro-batches: "
                 f"bubble {sim.bubble:.3f} simulated vs {theory:.3f} theory")
        try:
            draw_pipeline([("simulated", boxes_from_simulation(sim, args.virtual), "units")], args.out, title,
                          args.stages)
        except OSError as e:
            raise ConfigError(f"--out {args.out}: {e.strerror or e}") from None
        print(f"wrote {args.out}")
    return 0
