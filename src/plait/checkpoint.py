"""Checkpoints: written whole or not at all, loaded without running any code.

A checkpoint is a folder `checkpoints/step-000200/` holding

    model.safetensors   the parameters, keyed as nn.Sequential(*layers)
    optimizer.pt        the optimizer's state (tensors and numbers only)
    trainer.pt          step and random-number-generator states
    manifest.json       step, file sizes and SHA-256 checksums; written last

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
from safetensors.torch import load_file, save_file

from plait.errors import ConfigError

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                    optimizer_state: dict[str, Any], trainer_state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write a complete checkpoint for `step` and keep only the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, aliases = unique_tensors(model_state)
    save_file(tensors, tmp / "model.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save({"step": step, **trainer_state}, tmp / "trainer.pt")
    files = {}
    for name in ("model.safetensors", "optimizer.pt", "trainer.pt"):
        path = tmp / name
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        files[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": 1, "step": step, "files": files, "tied": aliases}
    with open(tmp / "manifest.json", "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a rerun of the same step replaces it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
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


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint folder: {"model", "optimizer", "trainer", "manifest"}.

    With `verify`, every file's checksum is compared with the manifest first;
    tied keys are restored as aliases of the tensor they share.
    """
    path = Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    if verify:
        for name, info in manifest["files"].items():
            if _sha256(path / name) != info["sha256"]:
                raise ConfigError(f"checkpoint {path}: {name} does not match its checksum; "
                                  f"the file is damaged, resume from an older checkpoint")
    model = load_file(path / "model.safetensors")
    for alias, key in manifest.get("tied", {}).items():
        model[alias] = model[key]
    return {
        "model": model,
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "trainer": torch.load(path / "trainer.pt", weights_only=True),
        "manifest": manifest,
    }
