import json

import pytest
import torch
from torch import nn

from plait.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from plait.errors import ConfigError
from plait.model import GPTConfig, build_gpt

CFG = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8)


def _save(run, step, keep=2):
    model = nn.Sequential(*build_gpt(CFG, seed=step))
    opt = torch.optim.AdamW(model.parameters())
    shards = {"optimizer-pp0": {"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}}
    return model, save_checkpoint(run, step, model.state_dict(), shards, {"layout": {"pp": 1}}, keep=keep)


def test_round_trip_restores_tied_weights(tmp_path):
    model, path = _save(tmp_path, 3)
    state = load_checkpoint(path, shard="optimizer-pp0")
    assert set(state["shard"]) == {"optimizer", "torch_rng"}
    fresh = nn.Sequential(*build_gpt(CFG, seed=99))
    fresh.load_state_dict(state["model"])
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert state["manifest"]["tied"] == {"2.lm_head.weight": "0.wte.weight"}
    assert state["trainer"]["step"] == 3
    assert fresh[2].lm_head.weight is fresh[0].wte.weight  # loading keeps the tie


def test_keeps_the_newest_and_ignores_incomplete_folders(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    # A crash mid-write leaves a temporary folder, and a folder without a manifest is not a checkpoint.
    (tmp_path / "checkpoints" / ".step-000004.tmp-123").mkdir()
    (tmp_path / "checkpoints" / "step-000005").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000003"


def test_manifest_lists_sizes_and_checksums(tmp_path):
    _, path = _save(tmp_path, 7)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7
    assert set(manifest["files"]) == {"model.safetensors", "optimizer-pp0.pt", "trainer.pt"}
    for name, info in manifest["files"].items():
        assert info["bytes"] == (path / name).stat().st_size and len(info["sha256"]) == 64


def test_damaged_file_is_refused(tmp_path):
    _, path = _save(tmp_path, 1)
    data = bytearray((path / "optimizer-pp0.pt").read_bytes())
    data[-10] ^= 0xFF
    (path / "optimizer-pp0.pt").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"optimizer-pp0.pt does not match its checksum"):
        load_checkpoint(path, shard="optimizer-pp0")
    with pytest.raises(ConfigError, match=r"has no optimizer-pp1.pt; it was written by another layout"):
        load_checkpoint(path, shard="optimizer-pp1")


def test_loading_never_unpickles_code(tmp_path):
    _, path = _save(tmp_path, 1)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"step": 1, "x": Evil()}, path / "trainer.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(path, verify=False)
