"""Checkpoints: written whole or not at all, loaded without running any code.

A checkpoint is a folder `checkpoints/step-000200/` holding

    model.safetensors   the whole model, keyed as nn.Sequential(*layers), whatever the layout
    optimizer-pp0.pt    per pipeline rank: its optimizer state and random-number-generator state
    trainer.pt          step and layout
    manifest.json       step, layout, file sizes and SHA-256 checksums; written last

It is written under a temporary name, every file is fsynced, and only then is
the folder renamed into place, so a crash leaves either the complete folder
or none. A folder without a manifest is never loaded. Loading uses
safetensors and `torch.load(weights_only=True)`: a checkpoint cannot execute
code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from plait.errors import ConfigError
from plait.fsync import fsync

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into distinct tensors and aliases (tied weights) -> the key they alias."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_key: dict[tuple[int, int], str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident in first_key:
            aliases[key] = first_key[ident]
        else:
            first_key[ident] = key
            unique[key] = t.detach().contiguous().cpu()
    return unique, aliases


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    shards: dict[str, dict[str, Any]], trainer_state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write a complete checkpoint for `step` and keep only the newest `keep`.

    `shards` maps a name (e.g. "optimizer-pp0") to what one rank needs back
    (tensors, numbers, strings and containers of them); each becomes `<name>.pt`.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, aliases = unique_tensors(model_state)
    save_file(tensors, tmp / "model.safetensors")
    for name, shard in shards.items():
        torch.save(shard, tmp / f"{name}.pt")
    torch.save({"step": step, **trainer_state}, tmp / "trainer.pt")
    files = {}
    for name in ["model.safetensors", *(f"{n}.pt" for n in shards), "trainer.pt"]:
        path = tmp / name
        fsync(path)
        files[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": 1, "step": step, "files": files, "tied": aliases}
    with open(tmp / "manifest.json", "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    fsync(tmp)
    if final.exists():  # a rerun of the same step replaces it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a manifest), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, shard: str | None = None, verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint folder: {"model", "shard", "trainer", "manifest"}.

    `shard` names the per-rank file to read (e.g. "optimizer-pp0"). With
    `verify`, checksums are compared with the manifest first; tied keys are
    restored as aliases of the tensor they share.
    """
    path = Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    if shard is not None and f"{shard}.pt" not in manifest["files"]:
        raise ConfigError(f"checkpoint {path} has no {shard}.pt; it was written by another layout")
    if verify:
        for name, info in manifest["files"].items():
            if name.endswith(".pt") and name not in (f"{shard}.pt", "trainer.pt"):
                continue  # other ranks' shards: theirs to check
            if _sha256(path / name) != info["sha256"]:
                raise ConfigError(f"checkpoint {path}: {name} does not match its checksum; "
                                  f"the file is damaged, resume from an older checkpoint")
    model = load_file(path / "model.safetensors")
    for alias, key in manifest.get("tied", {}).items():
        model[alias] = model[key]
    return {
        "model": model,
        "shard": torch.load(path / f"{shard}.pt", weights_only=True) if shard is not None else None,
        "trainer": torch.load(path / "trainer.pt", weights_only=True),
        "manifest": manifest,
    }


def save_training_state(run_dir: str | Path, step: int, engine, optimizer: torch.optim.Optimizer,
                        keep: int) -> None:
    """Checkpoint a run; called on every rank.

    Replicas are identical, so the first data-parallel replica speaks for all:
    each of its pipeline ranks hands its layers, optimizer state and RNG state
    to global rank 0, which writes the checkpoint (the whole model in one
    file, keyed as one process would key it). Returns once it is on disk.
    """
    shard_name = f"optimizer-pp{engine.pp_rank}"
    shard = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
    model = {k: v.detach().cpu() for k, v in engine.state_dict().items()}
    parts = [(model, shard_name, shard)]
    if engine.pp_size > 1 and engine.mesh["dp"].get_local_rank() == 0:
        parts = [None] * engine.pp_size if dist.get_rank() == 0 else None
        dist.gather_object((model, shard_name, _to_cpu(shard)), parts, dst=0, group=engine.mesh.get_group("pp"))
    if not dist.is_initialized() or dist.get_rank() == 0:
        whole, shards = {}, {}
        for part_model, name, part_shard in parts:
            whole.update(part_model)
            shards[name] = part_shard
        for alias, key in engine.tied_keys.items():  # copies of one weight on two ranks: save it once
            if alias in whole and key in whole:
                whole[alias] = whole[key]
        layout = {"dp": engine.dp_size, "pp": engine.pp_size, "bounds": list(engine.partition.bounds),
                  "schedule": engine.schedule}
        save_checkpoint(run_dir, step, whole, shards, {"layout": layout}, keep=keep)
    if dist.is_initialized():
        dist.barrier()


def restore_training_state(path: str | Path, engine, optimizer: torch.optim.Optimizer) -> int:
    """Load a checkpoint into this rank's engine and optimizer; returns its step."""
    state = load_checkpoint(path, shard=f"optimizer-pp{engine.pp_rank}")
    saved = state["trainer"].get("layout", {})
    here = {"pp": engine.pp_size, "bounds": list(engine.partition.bounds)}
    if {k: saved.get(k) for k in here} != here:
        raise ConfigError(f"checkpoint {path} was written with pp={saved.get('pp')} and stages cut at "
                          f"{saved.get('bounds')}, this run has pp={here['pp']} cut at {here['bounds']}; "
                          f"resume with the same --pp, --virtual-stages and --split")
    engine.load_state_dict(state["model"])
    optimizer.load_state_dict(state["shard"]["optimizer"])
    torch.set_rng_state(state["shard"]["torch_rng"])
    return int(state["trainer"]["step"])


def _to_cpu(obj):
    """A copy of a nested state with every tensor on the CPU, for sending as an object."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
