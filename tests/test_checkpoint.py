import json

import pytest
import torch

from plait.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, newest_intact,
                              restore_training_state, save_training_state)
from plait.engine import Engine
from plait.errors import ConfigError
from plait.model import GPTConfig, build_gpt, gpt_loss

CFG = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8)


def _engine(seed=0):
    engine = Engine(build_gpt(CFG, seed=seed), gpt_loss, microbatches=1)
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-2)
    x = torch.randint(0, CFG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(seed))
    engine.train_step(x, x)
    opt.step()
    return engine, opt


def _save(run, step, keep=2):
    engine, opt = _engine(step)
    return engine, opt, save_training_state(run, step, engine, opt, keep=keep)


def test_round_trip_restores_model_optimizer_and_tie(tmp_path):
    engine, opt, path = _save(tmp_path, 3)
    fresh, fresh_opt = _engine(99)
    assert restore_training_state(path, fresh, fresh_opt) == 3
    for (k, a), b in zip(engine.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    for p, q in zip(engine.parameters(), fresh.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], fresh_opt.state[q]["exp_avg"])
    assert fresh.layers[2].lm_head.weight is fresh.layers[0].wte.weight  # loading keeps the tie
    state = load_checkpoint(path)
    assert state["manifest"]["tied"] == {"2.lm_head.weight": "0.wte.weight"}
    assert set(state["optimizer"]["state"]) == {k for k, _ in engine.named_parameters()}


def test_keeps_the_newest_and_ignores_incomplete_folders(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    # A crash mid-write leaves a temporary folder, and a folder without a manifest is not a checkpoint.
    (tmp_path / "checkpoints" / ".step-000004.tmp").mkdir()
    (tmp_path / "checkpoints" / "step-000005").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000003"


def test_manifest_lists_layout_sizes_and_checksums(tmp_path):
    _, _, path = _save(tmp_path, 7)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["layout"] == {"dp": 1, "pp": 1, "bounds": [0, 3], "schedule": "1f1b"}
    assert set(manifest["files"]) == {"model-pp00.safetensors", "optim-pp00.pt", "trainer.pt"}
    for name, info in manifest["files"].items():
        assert info["bytes"] == (path / name).stat().st_size and len(info["sha256"]) == 64


def test_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    _save(tmp_path, 1)
    _, _, path = _save(tmp_path, 2)
    data = bytearray((path / "optim-pp00.pt").read_bytes())
    data[-10] ^= 0xFF
    (path / "optim-pp00.pt").write_bytes(bytes(data))
    warnings = []
    assert newest_intact(tmp_path, warn=warnings.append).name == "step-000001"
    assert warnings == [f"plait: warning: skipping checkpoint {path}: optim-pp00.pt does not match its checksum"]
    with pytest.raises(ConfigError, match="optim-pp00.pt does not match its checksum"):
        load_checkpoint(path)
    _, _, third = _save(tmp_path, 3, keep=3)
    (third / "trainer.pt").unlink()  # truncated: a file is missing
    assert newest_intact(tmp_path, warn=warnings.append).name == "step-000001"
    assert warnings[-2] == f"plait: warning: skipping checkpoint {third}: trainer.pt is missing"


def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
    _, _, path = _save(tmp_path, 1)
    other = Engine(build_gpt(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16), seed=0),
                   gpt_loss)
    with pytest.raises(ConfigError) as e:
        restore_training_state(path, other, torch.optim.AdamW(other.parameters()))
    assert str(e.value) == (f"checkpoint {path} holds a different model: 0.wte.weight is [50, 8] there, "
                            f"[50, 16] here; resume with the run's own model options")


def test_loading_never_unpickles_code(tmp_path):
    _, _, path = _save(tmp_path, 1)
    ran = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(ran), "w"))

    torch.save({"step": 1, "x": Evil()}, path / "trainer.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(path, verify=False)
    assert not ran.exists()
