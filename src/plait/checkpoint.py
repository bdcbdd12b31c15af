"""Checkpoints: written whole or not at all, loaded on any layout, never running code.

A checkpoint is a folder `checkpoints/step-000200/` holding

    model-pp00.safetensors  each pipeline rank's layers, keyed as nn.Sequential(*layers) keys them
    optim-pp00.pt           its optimizer state, keyed by those same parameter names, and its RNG state
    trainer.pt              step and the layout that wrote it
    manifest.json           step, layout, tied keys, each file's size and SHA-256; written last

Every key is the parameter's name in the whole model, so what is saved does
not depend on how the layers were split: a run saved at dp=2 x pp=2 resumes
at dp=1 x pp=4 by reading the keys its stages need. The first data-parallel
replica writes (replicas are identical), each pipeline rank its own files,
into `.step-000200.tmp`; when all have fsynced, rank 0 writes the manifest
and renames the folder into place. A folder without a manifest, or whose
files do not match their checksums, is skipped in favour of an older one.
Loading uses safetensors and `torch.load(weights_only=True)`: nothing in a
checkpoint can execute.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from plait.errors import ConfigError, say
from plait.faults import maybe_die
from plait.fsync import fsync

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into distinct tensors and aliases (a tied weight) -> the key they alias.

    safetensors refuses tensors that share storage; the aliases go in metadata instead.
    """
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_key: dict[tuple, str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in first_key:
            aliases[key] = first_key[ident]
        else:
            first_key[ident] = key
            unique[key] = t.detach().contiguous().cpu()
    return unique, aliases


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_training_state(run_dir: str | Path, step: int, engine, optimizer: torch.optim.Optimizer,
                        keep: int = 2) -> Path:
    """Write a complete checkpoint of step `step`; called on every rank, returns once it is in place."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
        tmp.mkdir()
    _barrier()
    first_replica = engine.mesh is None or engine.mesh["dp"].get_local_rank() == 0
    if first_replica:
        r = engine.pp_rank
        save_file(unique_tensors(engine.state_dict())[0], tmp / f"model-pp{r:02d}.safetensors")
        torch.save({"optimizer": optimizer_state_by_name(engine, optimizer), "torch_rng": torch.get_rng_state()},
                   tmp / f"optim-pp{r:02d}.pt")
        fsync(tmp / f"model-pp{r:02d}.safetensors")
        fsync(tmp / f"optim-pp{r:02d}.pt")
    maybe_die("in-checkpoint", step)
    _barrier()
    if rank0:
        layout = {"dp": engine.dp_size, "pp": engine.pp_size, "bounds": list(engine.partition.bounds),
                  "schedule": engine.schedule}
        torch.save({"step": step, "layout": layout}, tmp / "trainer.pt")
        fsync(tmp / "trainer.pt")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {"format": 2, "step": step, "layout": layout, "tied": engine.tied_keys, "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        fsync(tmp / "manifest.json")
        fsync(tmp)
        if final.exists():  # a rerun of the same step replaces it whole
            shutil.rmtree(final)
        tmp.rename(final)
        fsync(root)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def optimizer_state_by_name(engine, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's per-parameter state keyed by parameter name (a tied copy by its first name)."""
    names = {p: engine.tied_keys.get(n, n) for n, p in engine.named_parameters()}
    sd = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {"state": {names[params[i]]: s for i, s in sd["state"].items()},
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]}


def load_optimizer_state_by_name(engine, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load name-keyed optimizer state into this rank's optimizer, whatever layout saved it."""
    names = {p: engine.tied_keys.get(n, n) for n, p in engine.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {i: saved["state"][names[p]] for i, p in enumerate(params) if names[p] in saved["state"]}
    groups, index = [], 0
    for group, kept in zip(optimizer.param_groups, saved["param_groups"]):
        groups.append({**kept, "params": list(range(index, index + len(group["params"])))})
        index += len(group["params"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints with a manifest, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint with a manifest, or None (see `newest_intact` for checksums)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def verify_checkpoint(path: str | Path) -> str | None:
    """None if every file the manifest lists is there with its checksum, else what is wrong."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    for name, info in manifest["files"].items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if (path / name).stat().st_size != info["bytes"] or _sha256(path / name) != info["sha256"]:
            return f"{name} does not match its checksum"
    return None


def newest_intact(run_dir: str | Path, warn=say) -> Path | None:
    """The newest checkpoint whose files all match the manifest; damaged ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"plait: warning: skipping checkpoint {path}: {problem}")
    return None


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint folder: {"model", "optimizer", "rng", "trainer", "manifest"}.

    "model" is the whole model keyed as nn.Sequential(*layers) (tied keys
    restored as aliases); "optimizer" the name-keyed optimizer state of every
    pipeline rank merged; "rng" each pipeline rank's RNG state by pp rank.
    """
    path = Path(path)
    if verify and (problem := verify_checkpoint(path)) is not None:
        raise ConfigError(f"checkpoint {path}: {problem}; the file is damaged, resume from an older checkpoint")
    manifest = json.loads((path / "manifest.json").read_text())
    model: dict[str, torch.Tensor] = {}
    optim: dict[str, Any] = {"state": {}, "param_groups": None}
    rng = {}
    for part in sorted(path.glob("model-pp*.safetensors")):
        model.update(load_file(part))
    for part in sorted(path.glob("optim-pp*.pt")):
        saved = torch.load(part, weights_only=True)
        optim["state"].update(saved["optimizer"]["state"])
        optim["param_groups"] = saved["optimizer"]["param_groups"]
        rng[int(part.stem.removeprefix("optim-pp"))] = saved["torch_rng"]
    for alias, key in manifest.get("tied", {}).items():
        if alias not in model and key in model:
            model[alias] = model[key]
    return {"model": model, "optimizer": optim, "rng": rng, "manifest": manifest,
            "trainer": torch.load(path / "trainer.pt", weights_only=True)}


def restore_training_state(path: str | Path, engine, optimizer: torch.optim.Optimizer) -> int:
    """Load a checkpoint into this rank's engine and optimizer, on any layout; returns its step."""
    state = load_checkpoint(path)
    mine = engine.state_dict()
    for key, value in mine.items():
        saved = state["model"].get(key)
        if saved is None or saved.shape != value.shape:
            got = "no such weight" if saved is None else f"{list(saved.shape)}"
            raise ConfigError(f"checkpoint {path} holds a different model: {key} is {got} there, "
                              f"{list(value.shape)} here; resume with the run's own model options")
    engine.load_state_dict(state["model"])
    load_optimizer_state_by_name(engine, optimizer, state["optimizer"])
    # The RNG of the same pipeline rank when the layout is unchanged (dropout then
    # resumes exactly); otherwise rank 0's.
    torch.set_rng_state(state["rng"].get(engine.pp_rank, state["rng"][0])
                        if state["trainer"]["layout"]["pp"] == engine.pp_size else state["rng"][0])
    return int(state["trainer"]["step"])
