"""Checkpoints: written whole or not at all, loaded on any layout and any machine, never running code.

A checkpoint is a folder `checkpoints/step-000200/` holding

    model-pp00.safetensors  each pipeline rank's layers, keyed as nn.Sequential(*layers) keys them
    optim-pp00.pt           its optimizer state, keyed by those same parameter names; under ZeRO,
    optim-pp00-dp01.pt      one file per data-parallel rank instead, each holding that rank's slice
    rng-pp00.pt             its RNG states: the CPU generator's, and its GPU's when it trains on one
    trainer.pt              step, the layout that wrote it, and the learning-rate plan (plait.lr)
    manifest.json           step, layout, tied keys, each file's size, SHA-256 and the keys it holds;
                            written last

Every key is the parameter's name in the whole model, so what is saved does
not depend on how the layers were split: a run saved at dp=2 x pp=2 resumes
at dp=1 x pp=4 by reading the keys its stages need, and each rank opens only
the files that the manifest says hold them. A tied weight is stored once,
under its first key, whatever the layout ([Note: a tied weight is stored
once]); the manifest's "tied" maps its other keys to that one. The first
data-parallel replica writes (replicas are identical), each pipeline rank
its own files (under ZeRO every replica writes its slice of the optimizer
state: [Note: ZeRO's state is saved where it is]), into `.step-000200.tmp`;
each writer fsyncs and hashes its own files and hands their sizes and hashes
to rank 0, which writes the manifest and renames the folder into place.
The waits between these phases run on a gloo group with a timeout of their
own (`checkpoint_group`, --checkpoint-timeout), not the step's. A folder
without a manifest, or whose files do not match their checksums, is skipped
in favour of an older one.

Saving is two halves: `stage_training_state` takes, on the training thread,
what needs the live tensors; `write_staged` writes, fsyncs, hashes, gathers
the entries on rank 0, writes the manifest and renames, using only the
checkpoint group. `save_training_state` runs both in turn;
plait.checkpoint_async runs the second in a background thread, on host copies.

This module writes; plait.checkpoint_read finds and loads (its public names
are importable from here too), and plait.optimizer_names keys optimizer
state by parameter name.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

# Reading lives in its own module; its public names are this module's too, as callers import them.
from plait.checkpoint_read import (FORMAT, _device, _sha256, checkpoint_step, latest_checkpoint, list_checkpoints,
                                   load_checkpoint, load_model, newest_intact, plan_reads, restore_training_state,
                                   trainer_state, verify_checkpoint)
from plait.errors import TrainingError, peer_failure
from plait.faults import maybe_die
from plait.fsync import follow_umask, fsync
from plait.optimizer_names import load_optimizer_state_by_name, optimizer_shard_by_name, optimizer_state_by_name

__all__ = ["FORMAT", "checkpoint_group", "checkpoint_step", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "load_model", "load_optimizer_state_by_name", "newest_intact",
           "optimizer_state_by_name", "plan_reads", "restore_training_state", "save_training_state", "Staged",
           "stage_training_state", "trainer_state", "unique_tensors", "verify_checkpoint", "write_staged"]

def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into distinct tensors and aliases (a tied weight) -> the key they alias.

    safetensors refuses tensors that share storage; the aliases go in metadata instead.
    """
    unique, aliases = _distinct(state)
    return {k: t.contiguous().cpu() for k, t in unique.items()}, aliases


def _distinct(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`unique_tensors` without the copy to the CPU: the distinct tensors themselves, detached."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_key: dict[tuple, str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in first_key:
            aliases[key] = first_key[ident]
        else:
            first_key[ident] = key
            unique[key] = t.detach()
    return unique, aliases


def checkpoint_group(timeout_s: float) -> dist.ProcessGroup | None:
    """The group a checkpoint's waits run on: every rank, gloo, `timeout_s`; None with no process group.

    Collective: every rank calls it once, at the same point of the run (torch
    names groups in the order they are made). gloo whatever the job's backend:
    the waits are between file writes on the host, and a gloo barrier blocks
    the host until every rank is there, where NCCL's only queues work on a GPU.
    Its own timeout, because writing and hashing a large model's files takes
    longer than any step should.
    """
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def _collective(step: int, fn) -> None:
    """Run one of the checkpoint's collectives; a timeout or a lost peer becomes one line."""
    try:
        fn()
    except RuntimeError as e:  # gloo's timeout or a closed connection (DistBackendError is a RuntimeError)
        raise TrainingError(f"rank {dist.get_rank()} gave up waiting for the other ranks while saving checkpoint "
                            f"{step}: {peer_failure(e)}; if writing it takes longer, raise --checkpoint-timeout"
                            ) from None


def _barrier(group, step: int) -> None:
    if dist.is_initialized():
        _collective(step, lambda: dist.barrier(group=group))


def _gather(part: dict, group, step: int) -> list[dict]:
    """Every rank's `part`, on rank 0 (the others get []); in one process, [part]."""
    if not dist.is_initialized():
        return [part]
    every = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    _collective(step, lambda: dist.gather_object(part, every, dst=0, group=group))
    return every or []


def _describe(path: Path, keys: list[str] | None = None) -> dict[str, Any]:
    """fsync a written file; its manifest entry: size, SHA-256 and, for model and optimizer parts, its keys."""
    fsync(path)
    entry: dict[str, Any] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}  # read back from the page cache
    if keys is not None:
        entry["keys"] = keys
    return entry


@dataclass
class Staged:
    """One rank's share of a checkpoint, as `stage_training_state` took it: all the writes need.

    `model` and `optim` are the live tensors, or host copies of them (plait.checkpoint_async),
    in which case training may go on while they are written. A replica other than the first
    writes nothing but its slice of a ZeRO optimizer's state, and holds nothing else.
    """

    run_dir: Path
    step: int
    keep: int
    rank0: bool  # writes trainer.pt and the manifest, renames the folder and prunes
    pp_rank: int
    writes: bool  # the first data-parallel replica: writes this pipeline rank's model and RNG files
    model: dict[str, torch.Tensor]  # the distinct tensors to store, a tied copy left out
    optim: dict[str, Any] | None  # name-keyed optimizer state (plait.optimizer_names); None: written by another
    rng: dict[str, Any] | None  # [Note: RNG states]
    layout: dict[str, Any]
    tied: dict[str, str]
    trainer: dict[str, Any]
    shard: int | None = None  # the dp rank whose slice of ZeRO's optimizer state `optim` is


def stage_training_state(run_dir: str | Path, step: int, engine, optimizer: torch.optim.Optimizer, keep: int = 2,
                         trainer: dict | None = None,
                         copy: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Staged:
    """Take what checkpoint `step` holds of this rank; every rank calls it, on the training thread.

    `copy`, if given, maps {"model": ..., "optim": ...} to copies that the next steps leave
    alone (plait.checkpoint_async.HostCopy); without it the live tensors are staged, and
    must be written before the next optimizer step.
    """
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    dp_rank = 0 if engine.mesh is None else engine.mesh["dp"].get_local_rank()
    writes = dp_rank == 0
    layout = {"dp": engine.dp_size, "pp": engine.pp_size, "bounds": list(engine.partition.bounds),
              "schedule": engine.schedule}
    # [Note: ZeRO's state is saved where it is] A ZeRO optimizer's state is 1/dp on each dp
    # rank: each writes its own slice (optim-ppXX-dpYY.pt), which takes no collective and no
    # memory beyond the state itself. Gathering it whole first, to write one file, would hold a
    # stage's whole state on a rank at every checkpoint: the memory ZeRO exists to save.
    sharded = hasattr(optimizer, "state_shard")
    optim_state = None
    if sharded:
        optim_state = optimizer_shard_by_name(engine, optimizer)
    elif writes:
        optim_state = optimizer_state_by_name(engine, optimizer)
    model, rng = {}, None
    if optim_state is not None:
        # [Note: a tied weight is stored once] Whatever the layout, a tied weight is one tensor under
        # its first key, written by the rank holding that key's layer; its other keys are only the
        # manifest's "tied". A rank holding its own copy under another key (the last pipeline stage's
        # head) writes neither the copy nor its optimizer state: both copies take identical steps
        # (parallel/tied.py), so the first holder's weight and state are the copy's too.
        tied = engine.tied_keys
        names = [n for n, _ in engine.named_parameters()]
        copies = {tied[n] for n in names if n in tied} - set(names)  # state saved under a first key held elsewhere
        optim_state = {**optim_state, **{part: {k: v for k, v in optim_state[part].items() if k not in copies}
                                         for part in ("state", "slices") if part in optim_state}}
    if writes:
        model = _distinct({k: v for k, v in engine.state_dict().items() if k not in engine.tied_keys})[0]
        # [Note: RNG states] Dropout draws from the generator of the device it runs on: the
        # CPU's, or this rank's GPU's. Both are CPU byte tensors, new ones at each call.
        device = _device(engine)
        rng = {"torch_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if copy is not None and (model or optim_state is not None):
        copied = copy({"model": model, "optim": optim_state})
        model, optim_state = copied["model"], copied["optim"]
    return Staged(Path(run_dir), step, keep, rank0, engine.pp_rank, writes, model, optim_state,
                  rng, layout, dict(engine.tied_keys), dict(trainer or {}), dp_rank if sharded else None)


def _write_part(tmp: Path, staged: Staged) -> dict[str, dict[str, Any]]:
    """Write, fsync and hash this rank's files, if it has any; returns their manifest entries."""
    r, entries = staged.pp_rank, {}
    if staged.writes:
        model, rng = f"model-pp{r:02d}.safetensors", f"rng-pp{r:02d}.pt"
        tensors = {k: t.contiguous().cpu() for k, t in staged.model.items()}  # host copies already are
        save_file(tensors, tmp / model)
        follow_umask(tmp / model)
        torch.save(staged.rng, tmp / rng)
        entries.update({model: _describe(tmp / model, sorted(tensors)), rng: _describe(tmp / rng)})
    if staged.optim is not None:
        optim = f"optim-pp{r:02d}.pt" if staged.shard is None else f"optim-pp{r:02d}-dp{staged.shard:02d}.pt"
        torch.save({"optimizer": staged.optim}, tmp / optim)
        entries[optim] = _describe(tmp / optim, sorted(staged.optim["state"]))
    return entries


def write_staged(staged: Staged, group: dist.ProcessGroup | None = None) -> Path:
    """Write a staged checkpoint; called on every rank, returns once the checkpoint is in place.

    Its only collectives are on `group` (`checkpoint_group`; None: the default group), so it may
    run on a thread of its own while the training thread uses the job's other groups.
    """
    step = staged.step
    root = staged.run_dir / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    if staged.rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
        tmp.mkdir()
    _barrier(group, step)
    written = _write_part(tmp, staged)
    maybe_die("in-checkpoint", step)
    parts = _gather(written, group, step)  # on rank 0 once every writer's files are on disk
    if staged.rank0:
        torch.save({**staged.trainer, "step": step, "layout": staged.layout}, tmp / "trainer.pt")
        files = {"trainer.pt": _describe(tmp / "trainer.pt")}
        for part in parts:
            files.update(part)
        manifest = {"format": FORMAT, "step": step, "layout": staged.layout, "tied": staged.tied,
                    "files": dict(sorted(files.items()))}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        fsync(tmp / "manifest.json")
        fsync(tmp)
        if final.exists():  # a rerun of the same step replaces it whole
            shutil.rmtree(final)
        tmp.rename(final)
        fsync(root)
        for old in list_checkpoints(staged.run_dir)[:-staged.keep]:
            shutil.rmtree(old)
    _barrier(group, step)
    return final


def save_training_state(run_dir: str | Path, step: int, engine, optimizer: torch.optim.Optimizer,
                        keep: int = 2, group: dist.ProcessGroup | None = None, trainer: dict | None = None) -> Path:
    """Write a complete checkpoint of step `step`; called on every rank, returns once it is in place.

    `group` carries the waits between its phases (`checkpoint_group`); None: the default group.
    `trainer` (plain numbers and strings) goes into trainer.pt beside the step; `trainer_state` reads it.
    The live tensors are written as they are: nothing is copied (plait.checkpoint_async copies, and
    writes in the background).
    """
    return write_staged(stage_training_state(run_dir, step, engine, optimizer, keep, trainer), group)
