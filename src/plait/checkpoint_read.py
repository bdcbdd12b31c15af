"""Reading checkpoints: finding the newest intact one, and loading it on any layout.

The format is described in plait.checkpoint, which writes it. Every rank
opens only the files the manifest says hold its keys, and checks their
checksums first. Loading uses safetensors and `torch.load(weights_only=True,
map_location="cpu")`: nothing in a checkpoint can execute, and one written on
GPUs loads on a machine without any.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from plait.errors import ConfigError, say
from plait.optimizer_names import SlicedState, load_optimizer_state_by_name

# 4: under ZeRO each dp rank's slice of the optimizer state in optim-ppXX-dpYY.pt.
# 3 (still read): the manifest lists the keys each file holds, RNG states are in rng-ppXX.pt.
# 2 (still read): no keys, so every part is read; the CPU RNG state inside optim-ppXX.pt.
# Format 3 checkpoints of pp > 1 written before a tied weight was stored once also hold the
# last stage's copy of the head and its optimizer state; they still load (see plan_reads).
FORMAT = 4

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_SLICE = re.compile(r"-dp\d+(?=\.pt$)")  # optim-pp00-dp01.pt: one dp rank's slice of optim-pp00's state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load(path: Path, mmap: bool = False) -> Any:
    # On the CPU whatever device saved it (a GPU run exported on a laptop); the
    # optimizer's load_state_dict moves each state to its parameter's device.
    # mmap: only the tensors used are read (another stage's file, for a tied weight's state).
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _device(engine) -> torch.device:
    """Where this rank's parameters live."""
    return next(engine.parameters()).device


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


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint was written at, from its manifest."""
    return int(_manifest(Path(path))["step"])


def trainer_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's trainer.pt: its step, layout and what `save_training_state` was given as `trainer`."""
    return _load(Path(path) / "trainer.pt")


def verify_checkpoint(path: str | Path, names: Iterable[str] | None = None) -> str | None:
    """None if every file the manifest lists (or those of `names`) is there with its checksum, else what is wrong."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    for name in manifest["files"] if names is None else names:
        info = manifest["files"].get(name)
        if info is None:
            return f"{name} is not in its manifest"
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


def _check(path: Path, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The manifest, once the files of `names` (default: all) match it; else a one-line ConfigError."""
    if (problem := verify_checkpoint(path, names)) is not None:
        raise ConfigError(f"checkpoint {path}: {problem}; the file is damaged, resume from an older checkpoint")
    return _manifest(path)


def _manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint {path}: unreadable manifest ({e}); resume from an older checkpoint") from None
    if manifest.get("format", 2) > FORMAT:
        raise ConfigError(f"checkpoint {path} is format {manifest['format']}, newer than this plait reads "
                          f"({FORMAT}); load it with the plait version that wrote it, or a newer one")
    return manifest


def plan_reads(manifest: dict[str, Any], prefix: str, wanted: Iterable[str] | None,
               tied: dict[str, str] | None = None) -> dict[str, set[str] | None]:
    """The files named `prefix`... to open for the keys `wanted`, each with the keys to take from it.

    A key no file holds is read under the key it is tied to: a tied head is
    stored once, as the embedding, on every layout, so the last pipeline
    stage reads its copy from the first stage's file. A key several files
    hold (the head's copy and its optimizer state, which older pp > 1
    checkpoints also stored on the last stage) comes from a file opened
    anyway, if there is one. ZeRO's slices of one pipeline rank's optimizer
    state (optim-pp00-dp00.pt, -dp01.pt, ...) count as one file: a key is
    read from every slice that holds part of it. `wanted=None`, or a format-2
    manifest, which lists no keys: every file, whole (None).
    """
    names = sorted(n for n in manifest["files"] if n.startswith(prefix))
    if wanted is None or manifest.get("format", 2) < 3:
        return {n: None for n in names}
    holders: dict[str, list[str]] = {}  # key -> the files (a pipeline rank's slices as one) holding it
    slices: dict[tuple[str, str], list[str]] = {}  # (file, key) -> the slices of it holding the key
    for n in names:
        whole = _SLICE.sub("", n)
        for key in manifest["files"][n]["keys"]:
            if whole not in holders.setdefault(key, []):
                holders[key].append(whole)
            slices.setdefault((whole, key), []).append(n)
    tied = tied or {}
    sources = {key if key in holders else tied.get(key) for key in wanted} & holders.keys()
    chosen: dict[str, set[str]] = {}
    for key in sorted(sources, key=lambda k: (len(holders[k]), k)):  # keys held once first
        whole = next((n for n in holders[key] if n in chosen), holders[key][0])
        chosen.setdefault(whole, set()).add(key)
    plan: dict[str, set[str] | None] = {}
    for whole, keys in chosen.items():
        for key in keys:
            for n in slices[(whole, key)]:
                plan.setdefault(n, set()).add(key)
    return dict(sorted(plan.items()))


def _read_model(path: Path, plan: dict[str, set[str] | None], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """The planned tensors, read on the CPU (safetensors reads just the keys asked for); aliases restored."""
    model: dict[str, torch.Tensor] = {}
    for name, keys in plan.items():
        with safe_open(str(path / name), framework="pt", device="cpu") as fh:
            for key in fh.keys() if keys is None else sorted(keys):
                model[key] = fh.get_tensor(key)
    # A tied key names the weight it is tied to, even where an older pp > 1 checkpoint also
    # stored the last stage's copy: read together, they are one tensor, as in one process.
    for alias, key in tied.items():
        if key in model:
            model[alias] = model[key]
    return model


def _read_optimizer(path: Path, plan: dict[str, set[str] | None], slices: bool = False) -> dict[str, Any]:
    """The planned optimizer states, name-keyed, with the saved param_groups; a state ZeRO saved
    in slices is a `SlicedState` of them (`_whole` makes it tensors).

    `slices`: for a ZeRO optimizer, which takes only its own elements of each state. A whole
    state read from a mapped file is then a `SlicedState` of one part, so that each rank copies
    its slice out of the mapping rather than the whole tensor (its elements line up with the
    parameter's: ZeRO supports element-wise optimizers only).
    """
    optim: dict[str, Any] = {"state": {}, "param_groups": None}
    for name, keys in plan.items():
        # A few entries of another rank's file (a tied weight's state), or one slice of each of a
        # parameter's states, are read from a mapping of the file: only those elements are read.
        sliced = _SLICE.search(name) is not None
        saved = _load(path / name, mmap=keys is not None or sliced)["optimizer"]
        for key in saved["state"] if keys is None else sorted(keys):
            state = saved["state"][key]
            if sliced:
                begin, end, *shape = saved["slices"][key]
                optim["state"].setdefault(key, SlicedState(tuple(shape))).parts.append((begin, end, state))
            elif keys is None:
                optim["state"][key] = state
            elif slices and (whole := _one_slice(state)) is not None:
                optim["state"][key] = whole
            else:
                optim["state"][key] = {n: v.clone() if torch.is_tensor(v) else v for n, v in state.items()}
        optim["param_groups"] = saved["param_groups"]
    return optim


def _one_slice(state: dict[str, Any]) -> SlicedState | None:
    """A whole parameter's state as a `SlicedState` of one part, viewing the tensors, not copying
    them; None if its tensors are not all the same size (not an element-wise optimizer's)."""
    tensors = {n: v for n, v in state.items() if torch.is_tensor(v) and v.dim() > 0}
    if len({v.numel() for v in tensors.values()}) != 1:
        return None
    shape = tuple(next(iter(tensors.values())).shape)
    flat = {n: tensors[n].reshape(-1) if n in tensors else v for n, v in state.items()}
    return SlicedState(shape, [(0, math.prod(shape), flat)])


def _whole(optim: dict[str, Any]) -> dict[str, Any]:
    """`optim` with every `SlicedState` put together into the whole parameter's state."""
    return {**optim, "state": {k: s.whole() if isinstance(s, SlicedState) else s for k, s in optim["state"].items()}}


def _rng_file(manifest: dict[str, Any], pp_rank: int) -> str:
    name = f"rng-pp{pp_rank:02d}.pt"
    return name if name in manifest["files"] else f"optim-pp{pp_rank:02d}.pt"  # format 2


def _read_rng(path: Path, name: str) -> dict[str, torch.Tensor | None]:
    saved = _load(path / name)
    return {"torch_rng": saved["torch_rng"], "cuda_rng": saved.get("cuda_rng")}


def load_model(path: str | Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """The whole model of a checkpoint, on the CPU, keyed as nn.Sequential(*layers) (tied keys as aliases).

    Reads the model files only: exporting a model need not read its optimizer state.
    """
    path = Path(path)
    manifest = _manifest(path)
    plan = plan_reads(manifest, "model-", None)
    if verify:
        _check(path, plan)
    return _read_model(path, plan, manifest.get("tied", {}))


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read a whole checkpoint folder onto the CPU: {"model", "optimizer", "rng", "trainer", "manifest"}.

    "model" is the whole model keyed as nn.Sequential(*layers) (tied keys
    restored as aliases); "optimizer" the name-keyed optimizer state of every
    pipeline rank merged; "rng" each pipeline rank's RNG states by pp rank
    ({"torch_rng", "cuda_rng"}, the latter None for a CPU run).
    """
    path = Path(path)
    manifest = _check(path) if verify else _manifest(path)
    return {"model": _read_model(path, plan_reads(manifest, "model-", None), manifest.get("tied", {})),
            "optimizer": _whole(_read_optimizer(path, plan_reads(manifest, "optim-", None))),
            "rng": {pp: _read_rng(path, _rng_file(manifest, pp)) for pp in range(manifest["layout"]["pp"])},
            "manifest": manifest, "trainer": _load(path / "trainer.pt")}


def restore_training_state(path: str | Path, engine, optimizer: torch.optim.Optimizer) -> int:
    """Load a checkpoint into this rank's engine and optimizer, on any layout; returns its step.

    Opens (and checks the checksums of) only the files that hold this rank's
    keys, as the manifest lists them; a format-2 checkpoint lists none, so all.
    """
    path = Path(path)
    manifest = _manifest(path)
    tied = manifest.get("tied", {})
    mine = engine.state_dict()
    model_plan = plan_reads(manifest, "model-", mine, tied)
    optim_plan = plan_reads(manifest, "optim-", {engine.tied_keys.get(n, n) for n, _ in engine.named_parameters()})
    if not optim_plan:  # no state for these parameters (yet): still the saved hyper-parameters
        first = next(iter(plan_reads(manifest, "optim-", None)))
        optim_plan = {first: set()}
    # The RNG of the same pipeline rank when the layout is unchanged (dropout then
    # resumes exactly); otherwise rank 0's.
    rng_file = _rng_file(manifest, engine.pp_rank if manifest["layout"]["pp"] == engine.pp_size else 0)
    _check(path, dict.fromkeys([*model_plan, *optim_plan, rng_file, "trainer.pt"]))  # format 2: rng in optim
    model = _read_model(path, model_plan, tied)
    for key, value in mine.items():
        saved = model.get(key)
        if saved is None or saved.shape != value.shape:
            got = "no such weight" if saved is None else f"{list(saved.shape)}"
            raise ConfigError(f"checkpoint {path} holds a different model: {key} is {got} there, "
                              f"{list(value.shape)} here; resume with the run's own model options")
    engine.load_state_dict(model)
    load_optimizer_state_by_name(engine, optimizer,
                                 _read_optimizer(path, optim_plan, slices=hasattr(optimizer, "state_shard")))
    rng = _read_rng(path, rng_file)
    torch.set_rng_state(rng["torch_rng"])
    device = _device(engine)
    if device.type == "cuda" and rng["cuda_rng"] is not None:  # see [Note: RNG states]
        torch.cuda.set_rng_state(rng["cuda_rng"], device)
    return int(_load(path / "trainer.pt")["step"])
