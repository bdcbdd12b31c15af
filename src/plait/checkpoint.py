"""Checkpoints: written whole or not at all, loaded on any layout and any machine, never running code.

A checkpoint is a folder `checkpoints/step-000200/` holding

    model-pp00.safetensors  each pipeline rank's layers, keyed as nn.Sequential(*layers) keys them
    optim-pp00.pt           its optimizer state, keyed by those same parameter names
    rng-pp00.pt             its RNG states: the CPU generator's, and its GPU's when it trains on one
    trainer.pt              step, the layout that wrote it, and the learning-rate plan (plait.lr)
    manifest.json           step, layout, tied keys, each file's size, SHA-256 and the keys it holds;
                            written last

Every key is the parameter's name in the whole model, so what is saved does
not depend on how the layers were split: a run saved at dp=2 x pp=2 resumes
at dp=1 x pp=4 by reading the keys its stages need, and each rank opens only
the files that the manifest says hold them. A tied weight is stored once,
under its first key, whatever the layout; the manifest's "tied" maps its
other keys to that one. The first data-parallel replica
writes (replicas are identical), each pipeline rank its own files, into
`.step-000200.tmp`; each writer fsyncs and hashes its own files and hands
their sizes and hashes to rank 0, which writes the manifest and renames the
folder into place. The waits between these phases run on a gloo group with
a timeout of their own (`checkpoint_group`, --checkpoint-timeout), not the
step's. A folder without a manifest, or whose files do not match their
checksums, is skipped in favour of an older one. Loading uses safetensors
and `torch.load(weights_only=True, map_location="cpu")`: nothing in a
checkpoint can execute, and one written on GPUs loads on a machine without any.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from plait.errors import ConfigError, TrainingError, peer_failure, say
from plait.faults import maybe_die
from plait.fsync import follow_umask, fsync

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
# 3: the manifest lists the keys each file holds, RNG states are in rng-ppXX.pt.
# 2 (still read): no keys, so every part is read; the CPU RNG state inside optim-ppXX.pt.
FORMAT = 3


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load(path: Path) -> Any:
    # On the CPU whatever device saved it (a GPU run exported on a laptop); the
    # optimizer's load_state_dict moves each state to its parameter's device.
    return torch.load(path, map_location="cpu", weights_only=True)


def _device(engine) -> torch.device:
    """Where this rank's parameters live."""
    return next(engine.parameters()).device


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


def _write_part(tmp: Path, engine, optim_state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Write, fsync and hash this pipeline rank's files; returns their manifest entries."""
    r = engine.pp_rank
    model, optim, rng = f"model-pp{r:02d}.safetensors", f"optim-pp{r:02d}.pt", f"rng-pp{r:02d}.pt"
    # [Note: a tied weight is stored once] Whatever the layout, a tied weight is one tensor under
    # its first key, written by the rank holding that key's layer; its other keys are only the
    # manifest's "tied". A rank holding its own copy under another key (the last pipeline stage's
    # head) writes neither the copy nor its optimizer state: both copies take identical steps
    # (parallel/tied.py), so the first holder's weight and state are the copy's too.
    tied = engine.tied_keys
    tensors = unique_tensors({k: v for k, v in engine.state_dict().items() if k not in tied})[0]
    copies = {tied[n] for n, _ in engine.named_parameters() if n in tied}
    optim_state = {**optim_state, "state": {k: v for k, v in optim_state["state"].items() if k not in copies}}
    device = _device(engine)
    save_file(tensors, tmp / model)
    follow_umask(tmp / model)
    torch.save({"optimizer": optim_state}, tmp / optim)
    # [Note: RNG states] Dropout draws from the generator of the device it runs on: the
    # CPU's, or this rank's GPU's. Both are CPU byte tensors.
    torch.save({"torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}, tmp / rng)
    return {model: _describe(tmp / model, sorted(tensors)), optim: _describe(tmp / optim, sorted(optim_state["state"])),
            rng: _describe(tmp / rng)}


def save_training_state(run_dir: str | Path, step: int, engine, optimizer: torch.optim.Optimizer,
                        keep: int = 2, group: dist.ProcessGroup | None = None, trainer: dict | None = None) -> Path:
    """Write a complete checkpoint of step `step`; called on every rank, returns once it is in place.

    `group` carries the waits between its phases (`checkpoint_group`); None: the default group.
    `trainer` (plain numbers and strings) goes into trainer.pt beside the step; `trainer_state` reads it.
    """
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
        tmp.mkdir()
    _barrier(group, step)
    first_replica = engine.mesh is None or engine.mesh["dp"].get_local_rank() == 0
    # Every dp rank takes part: a ZeRO optimizer gathers its shards here (plait.parallel.zero).
    optim_state = optimizer_state_by_name(engine, optimizer)
    written = _write_part(tmp, engine, optim_state) if first_replica else {}
    maybe_die("in-checkpoint", step)
    parts = _gather(written, group, step)  # on rank 0 once every writer's files are on disk
    if rank0:
        layout = {"dp": engine.dp_size, "pp": engine.pp_size, "bounds": list(engine.partition.bounds),
                  "schedule": engine.schedule}
        torch.save({**(trainer or {}), "step": step, "layout": layout}, tmp / "trainer.pt")
        files = {"trainer.pt": _describe(tmp / "trainer.pt")}
        for part in parts:
            files.update(part)
        manifest = {"format": FORMAT, "step": step, "layout": layout, "tied": engine.tied_keys,
                    "files": dict(sorted(files.items()))}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        fsync(tmp / "manifest.json")
        fsync(tmp)
        if final.exists():  # a rerun of the same step replaces it whole
            shutil.rmtree(final)
        tmp.rename(final)
        fsync(root)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    _barrier(group, step)
    return final


def _param_groups(optimizer) -> list[list]:
    """The parameters the optimizer's state_dict is indexed by, group by group: a ZeRO
    ShardedOptimizer's are the full parameters (`full_param_groups`), not its shard pieces."""
    full = getattr(optimizer, "full_param_groups", None)
    return full if full is not None else [group["params"] for group in optimizer.param_groups]


def optimizer_state_by_name(engine, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's per-parameter state keyed by parameter name (a tied copy by its first name)."""
    names = {p: engine.tied_keys.get(n, n) for n, p in engine.named_parameters()}
    sd = optimizer.state_dict()
    params = [p for group in _param_groups(optimizer) for p in group]
    return {"state": {names[params[i]]: s for i, s in sd["state"].items()},
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]}


def load_optimizer_state_by_name(engine, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load name-keyed optimizer state into this rank's optimizer, whatever layout saved it."""
    names = {p: engine.tied_keys.get(n, n) for n, p in engine.named_parameters()}
    params = [p for group in _param_groups(optimizer) for p in group]
    state = {i: saved["state"][names[p]] for i, p in enumerate(params) if names[p] in saved["state"]}
    groups, index = [], 0
    for group, kept in zip(_param_groups(optimizer), saved["param_groups"]):
        groups.append({**kept, "params": list(range(index, index + len(group)))})
        index += len(group)
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
        return json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint {path}: unreadable manifest ({e}); resume from an older checkpoint") from None


def plan_reads(manifest: dict[str, Any], prefix: str, wanted: Iterable[str] | None,
               tied: dict[str, str] | None = None) -> dict[str, set[str] | None]:
    """The files named `prefix`... to open for the keys `wanted`, each with the keys to take from it.

    A key no file holds is read under the key it is tied to: a tied head is
    stored once, as the embedding, on every layout, so the last pipeline
    stage reads its copy from the first stage's file. A key several files
    hold (the head's copy and its optimizer state, which older pp > 1
    checkpoints also stored on the last stage) comes from a file opened
    anyway, if there is one. `wanted=None`, or a format-2 manifest, which
    lists no keys: every file, whole (None).
    """
    names = sorted(n for n in manifest["files"] if n.startswith(prefix))
    if wanted is None or manifest.get("format", 2) < 3:
        return {n: None for n in names}
    holders: dict[str, list[str]] = {}
    for n in names:
        for key in manifest["files"][n]["keys"]:
            holders.setdefault(key, []).append(n)
    tied = tied or {}
    sources = {key if key in holders else tied.get(key) for key in wanted} & holders.keys()
    plan: dict[str, set[str] | None] = {}
    for key in sorted(sources, key=lambda k: (len(holders[k]), k)):  # keys held once first
        name = next((n for n in holders[key] if n in plan), holders[key][0])
        plan.setdefault(name, set()).add(key)
    return plan


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


def _read_optimizer(path: Path, plan: dict[str, set[str] | None]) -> dict[str, Any]:
    """The planned optimizer states, name-keyed, with the saved param_groups."""
    optim: dict[str, Any] = {"state": {}, "param_groups": None}
    for name, keys in plan.items():
        saved = _load(path / name)["optimizer"]
        optim["state"].update(saved["state"] if keys is None else {k: saved["state"][k] for k in keys})
        optim["param_groups"] = saved["param_groups"]
    return optim


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
            "optimizer": _read_optimizer(path, plan_reads(manifest, "optim-", None)),
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
    load_optimizer_state_by_name(engine, optimizer, _read_optimizer(path, optim_plan))
    rng = _read_rng(path, rng_file)
    torch.set_rng_state(rng["torch_rng"])
    device = _device(engine)
    if device.type == "cuda" and rng["cuda_rng"] is not None:  # see [Note: RNG states]
        torch.cuda.set_rng_state(rng["cuda_rng"], device)
    return int(_load(path / "trainer.pt")["step"])
