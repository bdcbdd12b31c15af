"""Starting the workers: torch's own elastic launcher, and Slurm scripts that call it.

    plait train --dp 2 --pp 2                       # 4 local workers, started by torch.distributed
    plait train --nnodes 2 --node-rank 0 --rdzv 10.0.0.1:29400 --dp 2 --pp 2   # on each machine
    torchrun --nproc-per-node 4 -m plait train --dp 2 --pp 2                 # the same, by hand

`plait <command>` run as a plain command with a layout of more than one
process hands itself to `torch.distributed.launcher.api.elastic_launch`
(what `torchrun` runs): it starts this node's share of the workers, each
running the same command line, with torch's c10d rendezvous. A worker sees
torchrun's environment (RANK, WORLD_SIZE, ...) and trains in place. No
spawner, rendezvous or port scheme of our own.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import signal
import socket
import sys
import time
import uuid
from datetime import timedelta

from plait.config import Config
from plait.errors import ConfigError, PlaitError, say


_LISTENERS: list[socket.socket] = []  # the rendezvous store's listening socket, open for the launcher's life
RDZV_BACKEND = "plait-c10d"


def _c10d_bound_to_endpoint(params):
    """torch's c10d rendezvous, with its store listening on the endpoint's address only.

    torch's own "c10d" backend creates a TCPStore that listens on every
    interface. This is the same backend and handler, fed a store whose
    listening socket was bound to the address given (port 0: one the system
    picks) before TCPStore took it over.
    """
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=29400)
    timeout = timedelta(seconds=params.get_as_int("read_timeout", 60))
    if params.get_as_bool("is_host", True):
        listener = socket.create_server((host, port))
        _LISTENERS.append(listener)
        store = TCPStore(host, listener.getsockname()[1], is_master=True, multi_tenant=True, timeout=timeout,
                         master_listen_fd=listener.fileno(), wait_for_workers=False)
    else:
        store = TCPStore(host, port, is_master=False, timeout=timeout)

    class Backend(C10dRendezvousBackend):
        @property
        def name(self) -> str:  # the registry checks a handler answers to the name it was asked by
            return RDZV_BACKEND

    return create_handler(store, Backend(store, params.run_id), params)


def _register_rendezvous() -> None:
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    rendezvous_handler_registry.register(RDZV_BACKEND, _c10d_bound_to_endpoint)  # again is a no-op


def _honour_shutdown_timeout() -> None:
    """Make torch's elastic agent wait `shutdown_timeout`, not 30 s, for workers it stops.

    When one worker fails, torch's process context stops the others with
    `close()` at its default of 30 s, whatever `shutdown_timeout` says, and so
    does `LocalElasticAgent._stop_workers`. A worker that cannot act on SIGTERM
    (stopped, or wedged in C++) then held a failed job for 30 s before its
    SIGKILL, both before reporting and before a restart. The agent and the
    process context stay torch's; only the default of that one call changes.
    """
    import torch.distributed.launcher.api as launcher_api
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    if getattr(launcher_api.LocalElasticAgent, "plait", False):
        return

    class Agent(LocalElasticAgent):
        plait = True

        def _start_workers(self, worker_group):
            started = super()._start_workers(worker_group)
            pcontext, limit = self._pcontext, getattr(self, "_shutdown_timeout", 30)
            if pcontext is not None:
                close = pcontext.close
                pcontext.close = lambda death_sig=None, timeout=limit: close(death_sig, min(timeout, limit))
                if _FORWARDER is not None:  # after torch's process context took the signals: ours win
                    _FORWARDER.attach(pcontext)
            return started

    launcher_api.LocalElasticAgent = Agent


class StopForwarder:
    """The launcher's part of a graceful stop (plait/stop.py): the first stop signal goes on to this
    node's workers, and the launcher goes on waiting for them to checkpoint and leave; a second,
    more than `window_s` later, is torch's: its agent stops the workers (SIGTERM, then SIGKILL).

    torch's agent, left alone, takes SIGTERM and SIGINT as "tear down now" and lets a signal such
    as SIGUSR1 end the launcher by default, so a stop lost the step in progress and everything
    since the last checkpoint.
    """

    def __init__(self, stop_signal: str, window_s: float = 2.0):
        from plait.stop import signals_for

        self.signals = signals_for(stop_signal)
        self.window_s = window_s
        self.first: float | None = None
        self._pcontext = None

    def attach(self, pcontext) -> None:
        """Take the stop signals for the workers of `pcontext` (each restart round has its own)."""
        self._pcontext = pcontext
        for sig in self.signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            for pid in self._pcontext.pids().values():
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:  # already gone: the agent will see it
                    pass
            return
        if now - self.first < self.window_s:  # the same stop, arriving twice (Ctrl-C reaches the whole group)
            return
        from torch.distributed.elastic.multiprocessing.api import _terminate_process_handler

        _terminate_process_handler(signum, frame)  # raises torch's SignalException: its agent tears down


_FORWARDER: StopForwarder | None = None


def forwarded_a_stop() -> bool:
    """Whether this launcher passed a stop signal on to its workers (plait/stop.py)."""
    return _FORWARDER is not None and _FORWARDER.first is not None


def under_launcher() -> bool:
    """True in a worker started by torchrun, elastic_launch or srun-with-torchrun."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(cfg: Config, command: str, argv: list[str], devices: tuple[str, str] = ("auto", "auto")) -> int:
    """Start this node's workers, each running `python -m plait <command> <argv>`; their exit code.

    `devices` is the (device, backend) the workers will ask for: a pair that
    disagrees, or more workers on this node than GPUs, is refused here
    (`check_devices`) before anything starts. The rendezvous is at `--rdzv`
    (node 0 hosts the store; on one node too, when given, and a busy port is
    refused), else on 127.0.0.1 with a port the system picks. Every listening
    socket (the rendezvous store, the workers' store, gloo's) is bound to the
    address given, not to all interfaces. A node other than 0 first waits up to
    --timeout for node 0's store to answer (`_wait_for_rendezvous`).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_devices(cfg, *devices)
    lc = cfg.launch
    world = cfg.parallel.world_size
    nproc = world // lc.nnodes
    # A fresh rendezvous store per restart round: the shared one lets a restarted
    # gloo worker read its dead peer's old address (see the team's notes).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # Share the cores: more threads than cores per worker only thrash.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # we report failures ourselves
    _register_rendezvous()
    _honour_shutdown_timeout()
    host_node = lc.node_rank == 0
    # --rdzv is honoured on one machine too (a port a firewall lets through, say);
    # without it the store listens on 127.0.0.1, on a port the system picks.
    endpoint = lc.rdzv or "127.0.0.1:0"
    rdzv_configs = {"is_host": host_node}
    if math.isfinite(cfg.parallel.timeout):  # the store's connect and read timeout: --timeout, not torch's 60 s
        rdzv_configs["read_timeout"] = math.ceil(cfg.parallel.timeout)
    config = LaunchConfig(
        min_nodes=lc.nnodes,
        max_nodes=lc.nnodes,
        nproc_per_node=nproc,
        run_id=f"plait-{lc.rdzv}" if lc.rdzv else f"plait-{uuid.uuid4().hex[:8]}",
        rdzv_backend=RDZV_BACKEND,
        rdzv_endpoint=endpoint,
        rdzv_configs=rdzv_configs,
        max_restarts=lc.max_restarts,
        monitor_interval=0.2,
        start_method="spawn",
        shutdown_timeout=5,  # a worker that ignores SIGTERM (stopped, wedged) gets SIGKILL after 5 s, not 30
        local_addr=lc.rdzv.rsplit(":", 1)[0] if lc.rdzv and host_node else None,
    )
    if lc.rdzv and host_node:
        _check_port_free(lc.rdzv)
    elif lc.rdzv:
        _wait_for_rendezvous(lc.rdzv, cfg.parallel.timeout)
    global _FORWARDER
    _FORWARDER = StopForwarder(cfg.launch.stop_signal)
    try:
        elastic_launch(config, sys.executable)("-m", "plait", command, *argv)
    except SignalException as e:  # a second stop signal (StopForwarder), or SIGHUP/SIGQUIT: torch stopped the workers
        name = signal.Signals(e.sigval).name
        second = f"a second {name}" if _FORWARDER.first is not None else name
        say(f"plait: stopped at once on {second}; the workers were stopped without another checkpoint")
        return 128 + e.sigval
    except ChildFailedError as e:
        dp = cfg.parallel.dp
        silent = _silent_ranks(e.failures.values())
        if silent:  # waiters named it (plait.watchdog); it was then stopped by us, which says nothing
            r = silent[0]
            raise PlaitError(f"worker rank {r} (dp={r % dp}, pp={r // dp}) stopped answering: its peers waited "
                             f"--timeout {cfg.parallel.timeout:g} s for it; the other workers were stopped") from None
        killed = {r: f for r, f in e.failures.items() if f.exitcode < 0 and f.exitcode != -signal.SIGTERM}
        # A worker killed by a signal is the cause; its neighbours' errors (which name it) are the effect.
        first_rank, first = min(killed.items()) if killed else e.get_first_failure()
        if first.exitcode in (1, 2):  # the worker said what went wrong itself; the rest were stopped
            return first.exitcode
        how = (f"was killed by {signal.Signals(-first.exitcode).name}" if first.exitcode < 0
               else f"exited with code {first.exitcode}")
        hint = "" if lc.max_restarts else "; with --max-restarts N it would carry on from the newest checkpoint"
        raise PlaitError(f"worker rank {first_rank} (dp={first_rank % dp}, pp={first_rank // dp}) {how}; "
                         f"the other workers were stopped{hint}") from None
    except Exception as e:  # the launcher's own failures (rendezvous timeout, ...)
        raise PlaitError(f"the launcher failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return 0


def check_devices(cfg: Config, device: str, backend: str) -> None:
    """Refuse, in the launching parent, what each worker would refuse (see [Note: one device choice]).

    A device and backend that disagree, and on CUDA more of this node's
    workers (dp x pp / nnodes) than visible GPUs: two ranks would share a
    GPU. Workers started by torchrun check the same in `distributed.init`.
    """
    from plait.distributed import check_local_gpus, choose_device

    p, nnodes = cfg.parallel, cfg.launch.nnodes
    if choose_device(device, backend) == "cuda":
        nproc = p.world_size // nnodes
        what = f"dp({p.dp}) x pp({p.pp})" + (f" / nnodes({nnodes})" if nnodes > 1 else "") + f" = {nproc}"
        check_local_gpus(nproc, what, "lower --dp or --pp, spread the workers over more machines (--nnodes), "
                                      "or use --device cpu")


def _silent_ranks(failures) -> list[int]:
    """Ranks that workers' watchdogs found silent (in their torchelastic error files), most named first."""
    named: dict[int, int] = {}
    for failure in failures:
        data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
        rank_ = (data.get("plait") or {}).get("silent_rank")
        if isinstance(rank_, int):
            named[rank_] = named.get(rank_, 0) + 1
    return sorted(named, key=lambda r: (-named[r], r))


def _check_port_free(endpoint: str) -> None:
    """Refuse a rendezvous address this node cannot listen on, before starting anything."""
    host, port = endpoint.rsplit(":", 1)
    try:
        socket.create_server((host, int(port))).close()
    except OSError as e:
        reason = (e.strerror or str(e)).split(" (while attempting")[0]
        raise ConfigError(f"--rdzv {endpoint}: cannot listen there ({reason}); choose a free port, "
                          f"or an address of this machine") from None


def _wait_for_rendezvous(endpoint: str, timeout: float) -> None:
    """Wait up to `timeout` seconds for node 0's rendezvous store to accept a connection; refuse if it never does.

    torch's TCPStore client, left to itself, ignores --timeout: it tries for
    its own read timeout, logs a C++ stack of some 40 lines, tries again after
    a random delay, and fails with exit 1 after 76 to 120 s. A plain connect,
    repeated until the deadline, says the same in one line. It only knocks:
    the rendezvous itself is still torch's, once node 0 answers.
    """
    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            socket.create_connection((host, int(port)), timeout=max(0.1, min(left, 5.0))).close()
            return
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConfigError(f"--rdzv {endpoint}: node 0's rendezvous did not answer within --timeout "
                              f"{timeout:g} s ({reason}); start node 0 (--node-rank 0) with the same --rdzv, "
                              f"or give its address") from None
        time.sleep(min(0.5, left))  # node 0 may still be starting


# Slurm's time formats (sbatch --time): minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
SLURM_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}")
# What may go into an #SBATCH line unquoted: sbatch reads it without a shell, so a
# space or quote would end the value early or become part of the name.
SLURM_NAME = re.compile(r"[A-Za-z0-9._-]+")
SLURM_PARTITIONS = re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*")  # sbatch takes a list: gpu,gpu-long


def check_slurm_options(nodes: int, gpus_per_node: int, partition: str | None, time: str | None,
                        job_name: str, signal_grace: int = 120) -> None:
    """Refuse, by option, what would make a broken or unsafe sbatch script."""
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {value})")
    if not 0 <= signal_grace <= 65535:  # sbatch --signal's limit
        raise ConfigError(f"--signal-grace must be between 0 and 65535 seconds (got {signal_grace})")
    if time is not None and not SLURM_TIME.fullmatch(time):
        raise ConfigError(f"--time {time!r} is not a Slurm time limit; use minutes, MM:SS, HH:MM:SS, D-HH, "
                          f"D-HH:MM or D-HH:MM:SS, e.g. 04:00:00")
    if not SLURM_NAME.fullmatch(job_name):
        raise ConfigError(f"--job-name {job_name!r}: use letters, digits, '.', '_' and '-' only")
    if partition is not None and not SLURM_PARTITIONS.fullmatch(partition):
        raise ConfigError(f"--partition {partition!r}: use letters, digits, '.', '_' and '-' only "
                          f"(several partitions: separated by commas)")


def _run_dir_of(train_args: list[str]) -> str | None:
    """The run folder the train options name (--out or --resume, the last one given), or None."""
    found = None
    for i, arg in enumerate(train_args):
        for flag in ("--out", "--resume"):
            if arg == flag and i + 1 < len(train_args):
                found = train_args[i + 1]
            elif arg.startswith(flag + "="):
                found = arg[len(flag) + 1:]
    return found


def slurm_script(nodes: int, gpus_per_node: int, train_args: list[str], partition: str | None = None,
                 time: str | None = None, job_name: str = "plait", cpus_per_task: int | None = None,
                 python: str | None = None, stop_signal: str = "SIGTERM", signal_grace: int = 120) -> str:
    """An sbatch script: one task per node, each starting that node's workers with the
    rendezvous on the allocation's first node.

    The workers run `python -m plait`, with `python` the absolute path of
    this interpreter by default: running a venv's or conda environment's own
    interpreter is what activating it does for Python, so the script works
    where `plait` is not on the compute nodes' PATH, as long as they see the
    same path (a shared file system).

    A long run outlives its allocation: Slurm sends `stop_signal` `signal_grace` seconds before
    the time limit (`--signal`, to the tasks, which pass it on to their workers), the run
    checkpoints the step it reached and exits with plait.stop.STOPPED (3), and the script puts
    the job back in the queue (`scontrol requeue`; `--requeue` also lets Slurm requeue it after a
    node failure or a preemption). A requeued job runs the script again, with the same job id:
    it finds the run's folder (config.toml there) and resumes it. The run folder is --out (or
    --resume) of the train options, else runs/<job name>-<job id>. `--open-mode=append` keeps
    each attempt's output in the one log.
    """
    check_slurm_options(nodes, gpus_per_node, partition, time, job_name, signal_grace)
    python = python or os.path.abspath(sys.executable)  # not resolved: a venv's python is a symlink out of it
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={gpus_per_node}"]
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if time:
        lines.append(f"#SBATCH --time={time}")
    run_dir = _run_dir_of(train_args)
    fresh = [a for a in train_args]
    if run_dir is None:
        fresh += ["--out", "__RUN_DIR__"]
    lines += [
        "#SBATCH --output=%x-%j.out",
        "#SBATCH --open-mode=append",
        f"#SBATCH --signal={stop_signal.removeprefix('SIG')}@{signal_grace}",
        "#SBATCH --requeue",
        "set -euo pipefail",
        "",
        "# plait runs with the Python this script was generated from, and so in its environment",
        "# (running a venv's own python needs no activation; plait need not be on PATH). The",
        "# compute nodes must see this path, e.g. on a shared file system; change it to use another.",
        f"python={shlex.quote(python)}",
        'if [ ! -x "$python" ]; then',
        '    echo "plait: $python is not on $(hostname); set python= in this script" >&2',
        "    exit 2",
        "fi",
        "",
        "# The first node of the allocation hosts torch's c10d rendezvous. The port is",
        "# derived from the job id, so two jobs sharing a node do not collide. sed, not head:",
        "# head stops reading after one line, and under pipefail scontrol's SIGPIPE fails the job.",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        "port=$((20000 + SLURM_JOB_ID % 20000))",
        "",
        "# The run's folder. A job that Slurm requeued (the run stopped on the signal before the time",
        "# limit, a preemption, a node failure) finds its run there and carries it on.",
        f"run={shlex.quote(run_dir)}" if run_dir is not None
        else 'run="runs/${SLURM_JOB_NAME:-plait}-${SLURM_JOB_ID}"',
        'if [ -f "$run/config.toml" ]; then',
        '    set -- --resume "$run"',
        "else",
        "    set -- " + " ".join('"$run"' if a == "__RUN_DIR__" else shlex.quote(a) for a in fresh),
        "fi",
        "",
        "set +e",
        "srun --kill-on-bad-exit=1 bash -c 'exec \"$0\" -m plait train \\",
        '    --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" --rdzv "$1:$2" "${@:3}"\' \\',
        '    "$python" "$head" "$port" "$@"',
        "code=$?",
        "set -e",
        "# 3: plait stopped on the signal with a checkpoint (plait.stop.STOPPED); back into the queue.",
        'if [ "$code" -eq 3 ]; then',
        '    echo "plait: stopped before the time limit; requeueing job $SLURM_JOB_ID to resume $run"',
        '    scontrol requeue "$SLURM_JOB_ID" || true  # a preemption may have requeued it already',
        "    exit 0",
        "fi",
        'exit "$code"',
        "",
    ]
    return "\n".join(lines)
