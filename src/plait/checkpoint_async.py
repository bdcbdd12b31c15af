"""Checkpoints that do not stall the step: staged on the training thread, written in one other.

    writer = CheckpointWriter(checkpoint_group(600.0))
    writer.save(run_dir, step, engine, optimizer)   # returns once this rank's state is staged
    ...                                             # training goes on while the files are written
    writer.wait()                                   # the write in flight is done, or its failure raised here

`save` first waits for the write in flight, if any (one at a time), then stages on the
caller's thread everything that needs the live tensors or the job's collectives: the
optimizer state by name (under ZeRO each dp rank's own slice, no collective), a host
copy of this rank's model and optimizer state, and the RNG states
(plait.checkpoint.stage_training_state). On a GPU the copy goes into pinned host buffers
with non_blocking copies and one event waited on, so the device's queue is not drained
tensor by tensor; on the CPU it is a plain copy. The buffers are kept from one checkpoint to
the next (pinning memory is slow, and reusing it avoids first-touch page faults): the cost
is one copy of the rank's model and optimizer state in host memory for the whole run.

One background thread then does the rest (plait.checkpoint.write_staged): the files,
fsync, SHA-256, the gather of manifest entries to rank 0, the manifest last, the atomic
rename, pruning and the final barrier. Those waits are on the checkpoint group
(plait.checkpoint.checkpoint_group), which only this thread uses while a write is in
flight; the training thread's collectives are on the job's other groups. The format and
the manifest-last protocol are plait.checkpoint's, unchanged: a process that dies
mid-write leaves a `.step-N.tmp` folder with no manifest, and the previous checkpoint
stays the newest intact one.

torch.distributed.checkpoint.async_save is the built-in: it stages the state dict into CPU
memory (by default a plain copy; a stager may keep pinned, shared buffers between calls) and
then runs DCP's `save` in a thread (or a process) and returns a Future. plait keeps its own
writer for its own format: a safetensors file of each pipeline rank's weights (which no
code can run on load, and which `plait export` and other tools read directly), keys that
name each parameter in the whole model (so any layout resumes any other, by reading only
the files its keys are in) and a manifest with sizes and SHA-256 sums written last (a
checkpoint is whole or ignored). DCP writes its own `.distcp` files and `.metadata`, with
no checksums. The staging idea is the same: copy to the host on the training thread,
write on another.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from plait.checkpoint import stage_training_state, write_staged
from plait.errors import PlaitError, TrainingError


class HostCopy:
    """Copies tensors into host buffers that are kept, and reused, from one call to the next.

    Callable on a tree of dicts, lists and tuples; returns the same tree with each tensor
    replaced by its copy. A buffer is reused by the tensor at the same place in the tree when
    its shape and dtype match, so the caller must be done with the previous call's copies (the
    writer waits for its write in flight before it stages again).
    """

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def __call__(self, tree: Any) -> Any:
        kept, self._buffers = self._buffers, {}
        devices: set[torch.device] = set()

        def copy(path: tuple, t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            buf = kept.get(path)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                # Pinned (page-locked) memory lets a GPU copy run asynchronously, by DMA.
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            buf.copy_(t, non_blocking=t.is_cuda)
            if t.is_cuda:
                devices.add(t.device)
            self._buffers[path] = buf
            return buf

        out = _map(tree, copy, ())
        for device in devices:  # one event: every copy queued before it on the device's stream is done
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            event.synchronize()
        return out


def _map(tree: Any, fn, path: tuple) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(path, tree)
    if isinstance(tree, dict):
        return {k: _map(v, fn, (*path, k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(v, fn, (*path, i)) for i, v in enumerate(tree))
    return tree  # numbers, strings, None: immutable, shared as they are


class CheckpointWriter:
    """Saves the step loop's checkpoints: staged on the caller's thread, written in one background thread.

    `group` carries the checkpoint's waits (plait.checkpoint.checkpoint_group); only the
    writer's thread uses it while a write is in flight. With `background=False` each `save`
    writes the live tensors before it returns, as plait.checkpoint.save_training_state does
    (--no-async-checkpoint).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, background: bool = True):
        self.group = group
        self.background = background
        self._copy = HostCopy() if background else None
        self._thread: threading.Thread | None = None
        self._step: int | None = None
        self._error: BaseException | None = None
        self.last: Path | None = None  # the newest checkpoint this writer put in place

    @property
    def busy(self) -> bool:
        """Whether a write is still going on."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def step(self) -> int | None:
        """The step of the write not yet waited on (going on, or done), or None."""
        return self._step

    def save(self, run_dir: str | Path, step: int, engine, optimizer: torch.optim.Optimizer, keep: int = 2,
             trainer: dict | None = None) -> None:
        """Checkpoint `step`; every rank calls it. Returns once this rank's state is staged: the
        files are written behind (or, with background=False, before it returns).

        Waits first for the write in flight, and raises its failure (TrainingError) if it failed.
        """
        self.wait()
        staged = stage_training_state(run_dir, step, engine, optimizer, keep, trainer, copy=self._copy)
        if not self.background:
            self.last = write_staged(staged, self.group)
            return
        self._step = step
        self._thread = threading.Thread(target=self._write, args=(staged,), name=f"plait-checkpoint-{step}",
                                        daemon=True)  # a process that exits mid-write leaves only a .tmp folder
        self._thread.start()

    def _write(self, staged) -> None:
        try:
            self.last = write_staged(staged, self.group)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread by wait()
            self._error = e

    def wait(self, raising: bool = True) -> Path | None:
        """Block until the write in flight (if any) is done; returns the newest checkpoint written.

        Its failure is raised here, in the caller's thread, as one line (TrainingError); with
        `raising=False` it is dropped (the caller is failing already, for a reason of its own).
        """
        if self._thread is None:
            return self.last
        self._thread.join()
        step, error = self._step, self._error
        self._thread = self._step = self._error = None
        if error is not None and raising:
            raise TrainingError(_one_line(step, error)) from error
        return self.last


def _one_line(step: int, error: BaseException) -> str:
    if isinstance(error, PlaitError):  # already says what went wrong (a peer that did not answer)
        return str(error)
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return f"rank {rank} could not write checkpoint {step}: {type(error).__name__}" + (f": {text}" if text else "")
