"""Run folders: one per run, never written by two.

A run writes into its folder (--out, or a new runs/<date>-<time>) only when
the folder is new or empty, or when it was asked to go on with the run there:
`--resume RUN_DIR`, or a later round of the same job after torch's launcher
restarted the workers (--max-restarts). `plan_run_dir` makes that decision
and every check of a resume without writing anything, so a refused run
leaves no trace; the launching parent calls it before any worker starts, and
rank 0 of the workers again (a job started by torchrun has no parent).

`config.toml` does not record the folder: fed back with --config it
describes a new run, which gets a folder of its own, and a run folder that
was moved or copied does not point back at where it was made.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime
from pathlib import Path

from plait.checkpoint import checkpoint_step, list_checkpoints, newest_intact
from plait.config import Config
from plait.config_file import to_dict
from plait.errors import ConfigError, say


def restarted() -> bool:
    """True in a worker of a round after the first: torch's launcher restarted the job (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def default_run_dir(root: str | Path = "runs") -> str:
    """runs/<date>-<time>, the folder of a run given no --out; -2, -3, ... after it if that is taken."""
    base = Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return str(path)


def with_out(cfg: Config, out: str) -> Config:
    """`cfg` writing into `out`."""
    return dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, out=out))


def check_new(out: str | Path) -> None:
    """Refuse a folder that exists and holds anything: it belongs to another run, or to someone else."""
    path = Path(out)
    if not path.is_dir() or not any(path.iterdir()):
        return
    if (path / "config.toml").is_file():
        raise ConfigError(f"--out {out} already holds a run; continue it with --resume {out}, or give a new --out")
    raise ConfigError(f"--out {out} is not empty; give a new or empty folder as --out")


def plan_run_dir(cfg: Config, resume: str | None, warn=say) -> tuple[Path, Path | None]:
    """(the run's folder, the checkpoint it starts from or None), or a ConfigError; writes nothing.

    `resume` (--resume) must hold a complete checkpoint before --steps. A
    restarted round goes on from its folder's newest complete checkpoint, if
    any, by itself. Otherwise the folder must be new or empty (`check_new`).
    """
    out = cfg.output.out
    again = restarted()
    if resume is None and again and out and list_checkpoints(out):
        resume = out
    if resume is None:
        run_dir = Path(out or default_run_dir())
        if not again:  # a restarted round finds the files of the rounds before: its own run's
            check_new(run_dir)
        return run_dir, None
    start = newest_intact(resume, warn=warn)
    if start is None:
        raise ConfigError(f"--resume {resume}: no complete checkpoint in {resume}/checkpoints")
    step = checkpoint_step(start)
    # A restarted round may find the last checkpoint already written: it then only finishes the run.
    if not again and cfg.train.steps <= step:
        raise ConfigError(f"--steps {cfg.train.steps} is not past the checkpoint's step {step} in {resume}; "
                          f"give --steps {step + 1} or more")
    return Path(resume), start


def open_run_dir(run_dir: Path) -> None:
    """Create the run's folder (or reopen it) and prove it writable, leaving nothing in it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {run_dir}: cannot write there ({e.strerror}); choose another --out") from None


def save_config(run_dir: Path, cfg: Config) -> None:
    """Write the run's config.toml, without `out` (see the module's docstring).

    Called once a resume has loaded its checkpoint: a resume refused on the
    way (another model's checkpoint) leaves the saved options as they were.
    """
    import tomli_w

    saved = to_dict(cfg)
    saved["output"].pop("out", None)  # see the module's docstring
    (run_dir / "config.toml").write_text(tomli_w.dumps(saved))
