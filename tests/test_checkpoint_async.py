"""Checkpoints written in the background: the same files as the synchronous path, from copies that
training goes on past; a failed write surfaces from wait() as one line."""

import json
import threading

import pytest
import torch

from plait import checkpoint
from plait.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, newest_intact, save_training_state
from plait.checkpoint_async import CheckpointWriter, HostCopy
from plait.cli import _config_from, build_parser
from plait.errors import TrainingError
from tests.test_checkpoint import _engine


def _step(engine, opt, seed):
    """One more training step: every parameter and optimizer state changes in place."""
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(seed))
    engine.train_step(x, x)
    opt.step()
    opt.zero_grad()


class _Held:
    """Makes the checkpoint's model-file write wait until released (the background write held in flight)."""

    def __init__(self, monkeypatch):
        self.release, self.entered = threading.Event(), threading.Event()
        save_file = checkpoint.save_file

        def held(tensors, path):
            self.entered.set()
            assert self.release.wait(30)
            save_file(tensors, path)

        monkeypatch.setattr(checkpoint, "save_file", held)


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_async_and_sync_write_the_same_checkpoint_while_training_goes_on(tmp_path, monkeypatch):
    engine, opt = _engine(3)
    torch.manual_seed(11)
    sync = save_training_state(tmp_path / "sync", 1, engine, opt)
    torch.manual_seed(11)  # the same RNG state staged
    held = _Held(monkeypatch)
    writer = CheckpointWriter()
    writer.save(tmp_path / "async", 1, engine, opt)
    assert held.entered.wait(30) and writer.busy and writer.step == 1
    _step(engine, opt, seed=5)  # the live tensors move on while the files are written from the copies
    held.release.set()
    path = writer.wait()
    assert path == tmp_path / "async" / "checkpoints" / "step-000001" and not writer.busy and writer.step is None
    a, b = _manifest(sync), _manifest(path)
    assert list(a["files"]) == list(b["files"]) == ["model-pp00.safetensors", "optim-pp00.pt", "rng-pp00.pt",
                                                    "trainer.pt"]
    assert {n: f.get("keys") for n, f in a["files"].items()} == {n: f.get("keys") for n, f in b["files"].items()}
    assert (a["tied"], a["layout"], a["step"], a["format"]) == (b["tied"], b["layout"], b["step"], b["format"])
    assert (sync / "model-pp00.safetensors").read_bytes() == (path / "model-pp00.safetensors").read_bytes()
    assert a["files"]["model-pp00.safetensors"] == b["files"]["model-pp00.safetensors"]  # bytes and SHA-256
    # torch.save's files carry a random serialization id: their contents are compared instead.
    sa, sb = load_checkpoint(sync), load_checkpoint(path)
    for name, state in sa["optimizer"]["state"].items():
        assert state.keys() == sb["optimizer"]["state"][name].keys()
        assert all(torch.equal(v, sb["optimizer"]["state"][name][k]) for k, v in state.items()), name
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    assert torch.equal(sa["rng"][0]["torch_rng"], sb["rng"][0]["torch_rng"])
    moved = [k for k, p in engine.state_dict().items() if not torch.equal(p, sb["model"][k])]
    assert len(moved) == len(sb["model"])  # every live tensor moved on past what was written


def test_a_failed_background_write_surfaces_from_wait_as_one_line(tmp_path, monkeypatch):
    engine, opt = _engine(2)
    writer = CheckpointWriter()
    writer.save(tmp_path, 1, engine, opt)
    assert writer.wait() == tmp_path / "checkpoints" / "step-000001"

    def full(tensors, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    writer.save(tmp_path, 2, engine, opt)  # returns: the write fails behind
    with pytest.raises(TrainingError) as raised:
        writer.wait()
    assert str(raised.value) == "rank 0 could not write checkpoint 2: OSError: [Errno 28] No space left on device"
    assert not writer.busy and writer.step is None and writer.wait() == tmp_path / "checkpoints" / "step-000001"
    # The previous checkpoint stays the newest intact one; the failed one is a folder without a manifest.
    assert latest_checkpoint(tmp_path).name == newest_intact(tmp_path).name == "step-000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".step-000002.tmp", "step-000001"]
    monkeypatch.undo()
    writer.save(tmp_path, 2, engine, opt)  # the writer carries on; the leftover folder is replaced
    assert writer.wait() == tmp_path / "checkpoints" / "step-000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_the_next_save_waits_for_the_write_in_flight(tmp_path, monkeypatch):
    engine, opt = _engine(4)
    held = _Held(monkeypatch)
    writer = CheckpointWriter()
    writer.save(tmp_path, 1, engine, opt)
    assert held.entered.wait(30)
    threading.Timer(0.3, held.release.set).start()
    writer.save(tmp_path, 2, engine, opt)  # blocks until checkpoint 1 is in place
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    writer.wait()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]


def test_without_background_save_returns_with_the_checkpoint_in_place(tmp_path):
    engine, opt = _engine(5)
    writer = CheckpointWriter(background=False)
    writer.save(tmp_path, 3, engine, opt)
    assert not writer.busy and writer.last == latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000003"


def test_host_copies_reuse_their_buffers():
    copy = HostCopy()
    w, step = torch.arange(6.0).reshape(2, 3), torch.tensor(4.0)
    first = copy({"model": {"w": w}, "optim": {"state": {"w": {"step": step}}, "param_groups": [{"lr": 0.1}]}})
    assert torch.equal(first["model"]["w"], w) and first["model"]["w"].data_ptr() != w.data_ptr()
    assert first["optim"]["param_groups"] == [{"lr": 0.1}]
    w.add_(1.0)  # training moves on: the copy does not
    assert torch.equal(first["model"]["w"], torch.arange(6.0).reshape(2, 3))
    second = copy({"model": {"w": w}, "optim": {"state": {"w": {"step": step + 1}}}})
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()  # the same buffer, new values
    assert torch.equal(second["model"]["w"], w) and second["optim"]["state"]["w"]["step"].item() == 5.0
    other = copy({"model": {"w": torch.zeros(3)}})  # another shape: a new buffer
    assert other["model"]["w"].shape == (3,) and other["model"]["w"].data_ptr() != first["model"]["w"].data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_tensors_are_copied_into_pinned_host_buffers():
    copy = HostCopy()
    w = torch.randn(256, 256, device="cuda")
    for _ in range(2):
        w.mul_(2.0)  # queued work before the copy: the event orders the copy after it
        out = copy({"w": w, "step": torch.tensor(3.0)})
        assert out["w"].device.type == "cpu" and out["w"].is_pinned() and not out["step"].is_pinned()
        assert torch.equal(out["w"], w.cpu())


def test_async_checkpoint_option():
    parse = lambda *a: _config_from(build_parser().parse_args(["train", *a]))  # noqa: E731
    assert parse().output.async_checkpoint is True
    assert parse("--no-async-checkpoint").output.async_checkpoint is False
    assert parse("--async-checkpoint").output.async_checkpoint is True
