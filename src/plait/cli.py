"""The `plait` command.

    plait train [--config F.toml] [--resume RUN_DIR] [options]
    plait prepare --data PATH [--out DIR] [--tokenizer bpe|byte|TOKENIZER.json] [data options]
                                             tokenize a corpus into a folder of token shards
    plait verify [options]                   the layout next to a one-process float64 reference
    plait slurm --nodes N --gpus-per-node G [--partition P] [--time T] -- <train options>
    plait export RUN_DIR OUT [--format safetensors|hf] [--force]   the newest checkpoint, for use elsewhere
    plait schedule NAME --stages P --microbatches M [--virtual-stages V] [--out CHART.png [--force]]
                                             simulate a pipeline schedule: grid, bubble, chart

Exit codes: 0 done; 1 the run failed; 2 bad input. A failure plait can
explain (any `PlaitError`) is one line on stderr, with no traceback; in a
job of several workers only rank 0 says it. Nothing is written over: a new
run needs a new or empty --out (or --resume to go on with one), and an
existing file or folder is replaced only with --force.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from plait import commands
from plait.config import SECTIONS, field_type, flag_of
from plait.config_file import load_config, read_toml
from plait.errors import ConfigError, PlaitError, say
from plait.parallel.schedule import SCHEDULES


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as one-line ConfigErrors instead of usage dumps."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message}; see '{self.prog} --help'")


def _add_config_options(parser: argparse.ArgumentParser, sections: tuple[str, ...] | None = None) -> None:
    """One option per config field (of `sections`, default all), generated from the dataclasses' metadata.

    Defaults are suppressed so that only the options a user typed override the
    config file (or, on resume, the run's saved config).
    """
    for section, cls in SECTIONS.items():
        if sections is not None and section not in sections:
            continue
        group = parser.add_argument_group(f"{section} options ([{section}] in --config)")
        for f in dataclasses.fields(cls):
            meta = f.metadata
            default = f.default
            help_text = meta["help"] + ("" if default is None else f" (default: {default})")
            dest = f"{section}.{f.name}"
            if isinstance(default, bool):
                group.add_argument(flag_of(f), dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                kind = field_type(cls, f.name)[0]
                metavar = ("{" + ",".join(map(str, meta["choices"])) + "}" if meta.get("choices")
                           else {int: "N", float: "X"}.get(kind, f.name.upper()))
                group.add_argument(flag_of(f), dest=dest, default=argparse.SUPPRESS, metavar=metavar,
                                   help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="plait", description="Train GPT-style language models with data and "
                                               "pipeline parallelism.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    train = sub.add_parser("train", help="train a model",
                           description="Train a GPT. With no options: the parallel demo, dp=2 x pp=2 on 4 "
                                       "local processes, the tiny model on CPython's documentation.")
    train.add_argument("--config", metavar="FILE.toml", help="a TOML file of options, by section; "
                                                             "command-line options override it")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest checkpoint "
                                                           "(its saved config, overridden by any options given; "
                                                           "another --steps re-plans the rest of the LR decay)")
    _add_config_options(train)
    prepare = sub.add_parser("prepare", help="tokenize a corpus into a folder of token shards",
                             description="Tokenize a corpus, streamed in bounded memory on every core, into a "
                                         "folder of token shards with a manifest and the tokenizer; `plait train "
                                         "--data DIR` then trains from it directly. Without --out, the folder "
                                         "is the cache entry under --data-dir that `plait train --data PATH` "
                                         "with the same options uses.")
    prepare.add_argument("--out", metavar="DIR", help="the new folder to write (default: the cache under --data-dir)")
    prepare.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                         help="show a progress bar on a terminal (default: on)")
    _add_config_options(prepare, sections=("data",))
    verify = sub.add_parser("verify", help="check a layout against one process in float64",
                            description="Run a few steps of the given layout on a small float64 copy of the "
                                        "model next to a one-process reference; print the largest "
                                        "differences and a verdict (exit 0 pass, 1 fail). --steps is the "
                                        "number of steps compared (default here: 3). Train options it cannot "
                                        "honour (--dtype other than float64, --n-embd, --n-head, --block-size, "
                                        "--seq-len, --dropout above 0, --partition profile, the learning-rate "
                                        "schedule, data, evaluation, sampling and output options) are refused.")
    verify.add_argument("--config", metavar="FILE.toml", help="a TOML file of options, e.g. a run's config.toml: "
                                                              "what verify cannot use from it (and its steps) is "
                                                              "listed under the header, not refused")
    _add_config_options(verify)
    # The number of steps compared is --steps (default 3 here); the older spelling still works, unlisted.
    verify.add_argument("--verify-steps", dest="train.steps", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    slurm = sub.add_parser("slurm", help="print an sbatch script for a Slurm cluster",
                           description="Print an sbatch script that runs `plait train` on Slurm: one task per "
                                       "node, the rendezvous on the first node, with the Python (and so the "
                                       "environment) this command runs in, by its absolute path: plait need "
                                       "not be on the compute nodes' PATH. Train options go after --.")
    slurm.add_argument("--nodes", type=int, required=True, metavar="N", help="machines to allocate (>= 1)")
    slurm.add_argument("--gpus-per-node", type=int, required=True, metavar="G", help="GPUs on each (>= 1)")
    slurm.add_argument("--partition", metavar="NAME", help="Slurm partition, or several separated by commas")
    slurm.add_argument("--time", metavar="HH:MM:SS",
                       help="time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    slurm.add_argument("--job-name", default="plait", metavar="NAME",
                       help="letters, digits, '.', '_' and '-' (default: plait)")
    slurm.add_argument("--signal-grace", type=int, default=120, metavar="SECONDS",
                       help="Slurm sends the stop signal (--stop-signal, default SIGTERM) this long before the "
                            "time limit: the run checkpoints, stops and requeues itself (default: 120)")
    slurm.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN_OPTIONS")
    export = sub.add_parser("export", help="write a run's newest checkpoint as one file or a Hugging Face folder",
                            description="Export the newest complete checkpoint of a run: as one safetensors "
                                        "file that plait.export.load_exported reads (OUT is a file), or as a "
                                        "folder that transformers' GPT2LMHeadModel.from_pretrained loads, "
                                        "with the tokenizer (OUT is a new or empty folder).")
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (holds config.toml, checkpoints/)")
    export.add_argument("out", metavar="OUT", help="the file (safetensors) or folder (hf) to write")
    export.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                        help="safetensors: one plait file; hf: a Hugging Face GPT-2 folder (default: safetensors)")
    export.add_argument("--force", action="store_true",
                        help="replace an existing OUT (for hf, a folder an earlier export wrote)")
    report = sub.add_parser("report", help="summarise a run: throughput, MFU, bubble, time per rank, memory",
                            description="Print a run's summary table and write loss.png and throughput.png "
                                        "into its directory.")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--peak-tflops", type=float, metavar="X",
                        help="dense peak TFLOP/s of one device in the run's dtype, for MFU "
                             "(default: the figure the run recorded)")
    schedule = sub.add_parser("schedule", help="simulate a pipeline schedule and draw its timeline",
                              description="Simulate a pipeline schedule on an idealised machine (a rank waits "
                                          "only for its inputs) and print each rank's actions, the makespan, "
                                          "the bubble (simulated and theoretical) and the peak micro-batches "
                                          "in flight; with --out, draw the timeline as a PNG.")
    schedule.add_argument("name", metavar="NAME", help=f"the schedule: {', '.join(SCHEDULES)}")
    schedule.add_argument("--stages", type=int, required=True, metavar="P", help="pipeline ranks (pp)")
    schedule.add_argument("--microbatches", type=int, required=True, metavar="M", help="micro-batches per step")
    schedule.add_argument("--virtual-stages", dest="virtual", type=int, default=None, metavar="V",
                          help="pipeline stages per rank: >= 2 for interleaved-1f1b, 2 for zbv and dualpipev "
                               "(default: 2 for zbv and dualpipev, else 1)")
    schedule.add_argument("--virtual", dest="virtual", type=int, help=argparse.SUPPRESS)  # the older spelling
    schedule.add_argument("--forward-cost", type=float, default=1.0, metavar="X",
                          help="time of one micro-batch's forward through one rank's layers, shared "
                               "evenly by its virtual stages (default: 1)")
    schedule.add_argument("--backward-cost", type=float, default=2.0, metavar="X",
                          help="time of one micro-batch's backward through one rank's layers (default: 2)")
    schedule.add_argument("--input-cost", type=float, default=None, metavar="X",
                          help="time of one micro-batch's input gradient (I) through one rank's layers, "
                               "for the zero-bubble schedules (default: half the backward cost)")
    schedule.add_argument("--weight-cost", type=float, default=None, metavar="X",
                          help="time of one micro-batch's weight gradients (W) through one rank's layers, "
                               "for the zero-bubble schedules (default: half the backward cost)")
    schedule.add_argument("--comm-cost", type=float, default=0.0, metavar="X",
                          help="time added to every activation or gradient crossing ranks (default: 0)")
    schedule.add_argument("--out", metavar="CHART.png", help="draw the timeline into this PNG")
    schedule.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def _config_from(args: argparse.Namespace):
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    base = None
    if getattr(args, "resume", None):
        saved = Path(args.resume) / "config.toml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.toml there; give the directory of a plait run")
        base = read_toml(saved, what=f"--resume {args.resume} (its config.toml)")
        if isinstance(base.get("model"), dict):  # saved before padding: its weights are unpadded
            base["model"].setdefault("vocab_multiple", 1)  # [Note: padded vocabulary]
        overrides["output.out"] = args.resume
    return load_config(getattr(args, "config", None), overrides, base=base)


def _run_here_or_launch(cfg, command: str, argv: list[str], work, devices: tuple[str, str],
                        before_launch=None) -> int:
    """Run `work()` in this process if it is a worker (or the job is one process); else start the workers.

    `devices` is the command's (device, backend) request, which the launcher
    checks against this node before any worker starts (a worker checks again);
    so is `before_launch()`, if given.
    """
    from plait.launch import launch, under_launcher

    if under_launcher() or (cfg.parallel.world_size == 1 and cfg.launch.nnodes == 1):
        import torch.distributed as dist

        try:
            return work()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    if before_launch is not None:
        before_launch()
    return launch(cfg, command, argv, devices)


def _slurm(args: argparse.Namespace) -> int:
    from plait.launch import check_slurm_options, slurm_script

    check_slurm_options(args.nodes, args.gpus_per_node, args.partition, args.time, args.job_name)  # ours first
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    cfg = _config_from(build_parser().parse_args(["train", *train_args]))  # bad train options fail now
    if cfg.parallel.world_size != args.nodes * args.gpus_per_node:
        raise ConfigError(f"dp({cfg.parallel.dp}) * pp({cfg.parallel.pp}) = {cfg.parallel.world_size} != "
                          f"{args.nodes} nodes x {args.gpus_per_node} GPUs = {args.nodes * args.gpus_per_node}; "
                          f"choose --dp and --pp to fill the allocation")
    print(slurm_script(args.nodes, args.gpus_per_node, train_args, args.partition, args.time, args.job_name,
                       stop_signal=cfg.launch.stop_signal, signal_grace=args.signal_grace))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    """`plait prepare`: the corpus into --out (or the cache), then one line of what it holds."""
    import time

    from plait.data.corpus import prepare, prepare_to

    d = _config_from(args).data
    t0 = time.perf_counter()
    if args.out:
        data = prepare_to(args.out, d.data, progress=args.progress, **d.prepare_options())
    else:
        data = prepare(d.data, d.data_dir, progress=args.progress, **d.prepare_options())
    m = data.meta
    seconds = time.perf_counter() - t0
    done = (f"prepared in {seconds:.1f} s ({m['source_bytes'] / 1e6 / max(seconds, 1e-9):.1f} MB/s)" if data.built
            else "already prepared")
    print(f"{m['source']}: {m['documents']:,} documents, {m['source_bytes'] / 1e6:,.1f} MB -> "
          f"{m['train_tokens']:,} train / {m['val_tokens']:,} val tokens ({m['tokenizer']}, vocab "
          f"{m['vocab_size']:,}, {m['dtype']}, {len(m['shards'])} shard{'s' if len(m['shards']) > 1 else ''}) "
          f"in {data.dir}; {done}")
    return 0


# True once `entry()` runs: this process is the command's own (a launcher or a worker), not a caller's.
_COMMAND_PROCESS = False


def _freeze_imports() -> None:
    """Leave what has been imported so far (torch, once the trainer is imported) out of later GC passes.

    torch's modules, classes and functions live as long as the process, yet
    every full collection walked them all again: those that torch._dynamo's
    import sets off (the first optimizer imports it) cost each worker about
    1 s of CPU on a small machine. Only in the command's own process: a
    caller's heap (a test, a notebook running `main`) is not ours to freeze.
    A collection first, so that no garbage is kept for good.
    """
    if _COMMAND_PROCESS:
        import gc

        gc.collect()
        gc.freeze()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "slurm":
            return _slurm(args)
        if args.command == "export":
            return commands.export(args)
        if args.command == "schedule":
            return commands.schedule(args)
        if args.command == "report":
            return commands.report(args)
        if args.command == "prepare":
            return _prepare(args)
        try:
            cfg = _config_from(args)
        except ConfigError as e:
            e.shared = True  # every worker of a torchrun job reads the same options: rank 0 says it once
            raise
        rest = argv[1:]
        if args.command == "train":
            from plait.launch import under_launcher
            from plait.rundir import default_run_dir, plan_run_dir, with_out
            from plait.train import train  # the trainer's imports are paid only once the input is good

            _freeze_imports()

            if cfg.output.out is None and not under_launcher():
                # Chosen once, here: every worker, and every restarted round, writes into this folder.
                cfg = with_out(cfg, default_run_dir())
                rest = [*rest, "--out", cfg.output.out]

            if cfg.parallel.zero and cfg.parallel.dp == 1 and not under_launcher():
                # Not refused, so that one config runs on any layout; said once, by the command the user ran.
                say(f"plait: note: --zero {cfg.parallel.zero} does nothing at --dp 1: the one replica holds all "
                    f"the optimizer state; it shards it over --dp 2 or more")

            def check_before_launch() -> None:
                if cfg.parallel.max_memory_gb is not None:  # the workers check again (plait/memory.py)
                    from plait.distributed import choose_device
                    from plait.memory import check_fits

                    check_fits(cfg, cfg.data.vocab_size, choose_device(cfg.train.device, cfg.launch.backend))
                # On node 0 only: another machine may not see the folder. Rank 0 of the workers
                # decides again where it runs, and is the one to warn of a damaged checkpoint.
                if cfg.launch.node_rank == 0:
                    plan_run_dir(cfg, args.resume, warn=lambda _line: None)

            def run_training() -> int:
                from plait.stop import STOPPED, StopRequested, StopSignals, before_first_step_line

                stops = StopSignals(cfg.launch.stop_signal).install()
                # A worker under a launcher leaves a stop with 0, for torch's agent would restart it
                # otherwise; the launcher then returns STOPPED itself (plait/stop.py).
                stopped_code = 0 if under_launcher() else STOPPED
                rank0 = int(os.environ.get("RANK", 0)) == 0
                try:
                    result = train(cfg, resume=args.resume, stops=stops)
                except StopRequested as e:
                    if rank0:
                        print(before_first_step_line(e.name), flush=True)
                    return stopped_code
                except (PlaitError, RuntimeError):
                    if stops.requested is None:
                        raise
                    # A peer that stopped before the first step closed its connections: this is
                    # the same stop, not a failure.
                    if rank0:
                        print(before_first_step_line(stops.name), flush=True)
                    return stopped_code
                finally:
                    stops.uninstall()
                if result.stopped is not None:
                    if rank0:
                        print(result.stopped, flush=True)
                    return stopped_code
                return 0

            code = _run_here_or_launch(cfg, "train", rest, run_training, (cfg.train.device, cfg.launch.backend),
                                       check_before_launch)
            if code == 0 and not under_launcher() and cfg.parallel.world_size > 1:
                from plait.launch import forwarded_a_stop
                from plait.stop import STOPPED, stopped_short

                # The workers left with 0 after a stop as after the end: the stop went through this
                # launcher, or (a signal to one worker) left the run's newest checkpoint short of its end.
                if forwarded_a_stop() or (cfg.launch.node_rank == 0 and stopped_short(cfg.output.out, cfg.train.steps)):
                    return STOPPED
            return code
        from plait.verify import devices, options, verify

        _freeze_imports()

        checked = devices(cfg)
        steps, unused = options(cfg, {k for k in vars(args) if "." in k})
        return _run_here_or_launch(cfg, "verify", rest, lambda: verify(cfg, steps, unused=unused), checked)
    except PlaitError as e:
        if int(os.environ.get("RANK", 0)) == 0 or not e.shared:
            say(f"plait: error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        say("plait: interrupted")
        return 130


def entry() -> None:
    """The `plait` console command and `python -m plait`: run `main()` and exit with its code.

    A worker under a launcher leaves with `os._exit` once its process group is
    destroyed and its output flushed. A normal exit would run the interpreter's
    and C++'s teardown, where a collective library's background threads can
    still be alive; that teardown occasionally aborts the process
    ("terminate called without an active exception", SIGABRT) after the work
    is done, and the launcher then reports a finished run as failed.
    """
    global _COMMAND_PROCESS
    _COMMAND_PROCESS = True
    code = main()
    from plait.launch import under_launcher

    if under_launcher():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
