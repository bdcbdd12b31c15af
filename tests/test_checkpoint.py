import hashlib
import json
import os

import pytest
import torch

from plait import checkpoint, checkpoint_read
from plait.checkpoint import (checkpoint_group, latest_checkpoint, list_checkpoints, load_checkpoint, newest_intact,
                              plan_reads, restore_training_state, save_training_state)
from plait.cli import _config_from, build_parser
from plait.config_file import load_config
from plait.engine import Engine
from plait.errors import ConfigError
from plait.model import GPTConfig, build_gpt, gpt_loss
from tests.gpu_files import saved_as_cuda

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


def test_manifest_lists_layout_sizes_checksums_and_keys(tmp_path):
    _, _, path = _save(tmp_path, 7)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == 4 and manifest["step"] == 7
    assert manifest["layout"] == {"dp": 1, "pp": 1, "bounds": [0, 3], "schedule": "1f1b"}
    assert list(manifest["files"]) == ["model-pp00.safetensors", "optim-pp00.pt", "rng-pp00.pt", "trainer.pt"]
    for name, info in manifest["files"].items():
        assert info["bytes"] == (path / name).stat().st_size
        assert info["sha256"] == hashlib.sha256((path / name).read_bytes()).hexdigest()
    # The tied head is stored once, as the embedding, so its key is in no file's list.
    block = ("attn.c_attn", "attn.c_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")
    keys = ["0.wpe.weight", "0.wte.weight", *(f"1.{m}.{w}" for m in block for w in ("bias", "weight")),
            "2.ln_f.bias", "2.ln_f.weight"]
    assert manifest["files"]["model-pp00.safetensors"]["keys"] == keys
    assert manifest["files"]["optim-pp00.pt"]["keys"] == keys
    assert "keys" not in manifest["files"]["rng-pp00.pt"] and "keys" not in manifest["files"]["trainer.pt"]
    assert load_checkpoint(path)["rng"][0]["cuda_rng"] is None  # a CPU run has no GPU generator


def test_checkpoint_written_on_a_gpu_loads_on_the_cpu(tmp_path):
    engine, opt = _engine(3)
    with saved_as_cuda():
        path = save_training_state(tmp_path, 3, engine, opt)
    # Its files really are tagged for a GPU: read without map_location, they fail here.
    for name in ("optim-pp00.pt", "rng-pp00.pt"):
        with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
            torch.load(path / name, weights_only=True)
    fresh, fresh_opt = _engine(99)
    assert restore_training_state(path, fresh, fresh_opt) == 3
    for (name, p), q in zip(engine.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(opt.state[p]["exp_avg_sq"], fresh_opt.state[q]["exp_avg_sq"]), name
    state = load_checkpoint(path)
    assert state["optimizer"]["state"]["0.wte.weight"]["exp_avg"].device == torch.device("cpu")
    assert state["rng"][0]["torch_rng"].device == torch.device("cpu")


def test_gpu_rng_state_is_saved_and_restored(tmp_path, monkeypatch):
    # No GPU here: the engine's parameters are said to live on cuda:0 and torch.cuda's
    # generator calls are stand-ins, so what is checked is what checkpoint.py asks of them.
    cuda0, calls = torch.device("cuda", 0), []
    for module in (checkpoint, checkpoint_read):  # the writer and the reader each ask
        monkeypatch.setattr(module, "_device", lambda engine: cuda0)
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device: calls.append(("get", device)) or torch.arange(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: calls.append(("set", device, state.tolist())))
    engine, opt = _engine(2)
    torch.manual_seed(5)
    saved_cpu = torch.get_rng_state()
    path = save_training_state(tmp_path, 2, engine, opt)
    assert calls == [("get", cuda0)]
    torch.manual_seed(6)
    fresh, fresh_opt = _engine(99)
    restore_training_state(path, fresh, fresh_opt)
    assert calls[1:] == [("set", cuda0, list(range(16)))]
    assert torch.equal(torch.get_rng_state(), saved_cpu)
    monkeypatch.setattr(checkpoint_read, "_device", lambda engine: torch.device("cpu"))
    restore_training_state(path, fresh, fresh_opt)  # a GPU run resumed on the CPU: no GPU generator to set
    assert len(calls) == 2


def _as_format_2(path):
    """Rewrite a checkpoint as plait wrote them before format 3: no keys listed, the CPU RNG state inside
    optim-pp00.pt, no rng file."""
    optim = torch.load(path / "optim-pp00.pt", weights_only=True)
    rng = torch.load(path / "rng-pp00.pt", weights_only=True)
    torch.save({"optimizer": optim["optimizer"], "torch_rng": rng["torch_rng"]}, path / "optim-pp00.pt")
    (path / "rng-pp00.pt").unlink()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format"] = 2
    manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                         for p in sorted(path.iterdir()) if p.name != "manifest.json"}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_format_2_checkpoint_still_loads(tmp_path):
    engine, opt = _engine(4)
    torch.manual_seed(5)
    saved_cpu = torch.get_rng_state()
    path = save_training_state(tmp_path, 4, engine, opt)
    _as_format_2(path)
    torch.manual_seed(6)
    fresh, fresh_opt = _engine(99)
    assert restore_training_state(path, fresh, fresh_opt) == 4
    for (name, p), q in zip(engine.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(opt.state[p]["exp_avg"], fresh_opt.state[q]["exp_avg"]), name
    assert torch.equal(torch.get_rng_state(), saved_cpu)
    state = load_checkpoint(path)
    assert torch.equal(state["rng"][0]["torch_rng"], saved_cpu) and state["rng"][0]["cuda_rng"] is None


# A dp x pp=2 checkpoint's manifest as plait wrote them before a tied weight was stored once, cut
# down: stage 1 also stored its copy of the head, and that copy's optimizer state under the
# embedding's name, as stage 0's is.
PP2 = {"format": 3, "files": {
    "model-pp00.safetensors": {"keys": ["0.wte.weight", "1.ln_1.weight"]},
    "model-pp01.safetensors": {"keys": ["2.ln_f.weight", "3.lm_head.weight"]},
    "optim-pp00.pt": {"keys": ["0.wte.weight", "1.ln_1.weight"]},
    "optim-pp01.pt": {"keys": ["0.wte.weight", "2.ln_f.weight"]},
    "rng-pp00.pt": {}, "rng-pp01.pt": {}, "trainer.pt": {}}}
TIED = {"3.lm_head.weight": "0.wte.weight"}


def test_each_stage_reads_only_the_files_holding_its_keys():
    stage1 = ["2.ln_f.weight", "3.lm_head.weight"]
    assert plan_reads(PP2, "model-", stage1, TIED) == {"model-pp01.safetensors": set(stage1)}
    assert plan_reads(PP2, "optim-", ["0.wte.weight", "2.ln_f.weight"]) == {
        "optim-pp01.pt": {"0.wte.weight", "2.ln_f.weight"}}
    assert plan_reads(PP2, "optim-", ["1.ln_1.weight", "0.wte.weight"]) == {
        "optim-pp00.pt": {"0.wte.weight", "1.ln_1.weight"}}
    assert plan_reads(PP2, "model-", ["1.ln_1.weight"], TIED) == {"model-pp00.safetensors": {"1.ln_1.weight"}}  # pp=4
    # One process needs everything; the tied weight once, from whichever file is opened anyway.
    everything = ["0.wte.weight", "1.ln_1.weight", "2.ln_f.weight", "3.lm_head.weight"]
    assert plan_reads(PP2, "model-", everything, TIED) == {"model-pp00.safetensors": {"0.wte.weight", "1.ln_1.weight"},
                                                        "model-pp01.safetensors": {"2.ln_f.weight", "3.lm_head.weight"}}
    assert plan_reads(PP2, "optim-", ["0.wte.weight", "1.ln_1.weight", "2.ln_f.weight"]) == {
        "optim-pp00.pt": {"0.wte.weight", "1.ln_1.weight"}, "optim-pp01.pt": {"2.ln_f.weight"}}


# The same checkpoint as plait writes it now: the tied weight and its optimizer state once, on stage 0.
PP2_ONCE = {"format": 3, "files": {**PP2["files"], "model-pp01.safetensors": {"keys": ["2.ln_f.weight"]},
                                   "optim-pp01.pt": {"keys": ["2.ln_f.weight"]}}}


def test_the_last_stage_reads_the_tied_head_from_the_first_stages_files():
    stage1 = ["2.ln_f.weight", "3.lm_head.weight"]
    assert plan_reads(PP2_ONCE, "model-", stage1, TIED) == {"model-pp00.safetensors": {"0.wte.weight"},
                                                            "model-pp01.safetensors": {"2.ln_f.weight"}}
    assert plan_reads(PP2_ONCE, "optim-", ["0.wte.weight", "2.ln_f.weight"]) == {
        "optim-pp00.pt": {"0.wte.weight"}, "optim-pp01.pt": {"2.ln_f.weight"}}
    everything = ["0.wte.weight", "1.ln_1.weight", "2.ln_f.weight", "3.lm_head.weight"]
    assert plan_reads(PP2_ONCE, "model-", everything, TIED) == {
        "model-pp00.safetensors": {"0.wte.weight", "1.ln_1.weight"}, "model-pp01.safetensors": {"2.ln_f.weight"}}


def test_a_tied_key_is_read_from_the_weight_it_is_tied_to_and_format_2_reads_every_part():
    one_stage = {"format": 3, "files": {"model-pp00.safetensors": {"keys": ["0.wte.weight", "2.ln_f.weight"]}}}
    assert plan_reads(one_stage, "model-", ["2.ln_f.weight", "3.lm_head.weight"], TIED) == {
        "model-pp00.safetensors": {"0.wte.weight", "2.ln_f.weight"}}
    assert plan_reads({**PP2, "format": 2}, "model-", ["1.ln_1.weight"]) == {
        "model-pp00.safetensors": None, "model-pp01.safetensors": None}
    assert plan_reads(PP2, "optim-", None) == {"optim-pp00.pt": None, "optim-pp01.pt": None}


# A dp=2 x pp=2 ZeRO checkpoint's optimizer files: each dp rank's slice of each stage's state.
# The boundary between the slices of stage 0 cuts 1.ln_1.weight; stage 1's falls between its keys.
ZERO = {"format": 4, "files": {
    "optim-pp00-dp00.pt": {"keys": ["0.wte.weight", "1.ln_1.weight"]},
    "optim-pp00-dp01.pt": {"keys": ["1.ln_1.weight", "1.ln_1.bias"]},
    "optim-pp01-dp00.pt": {"keys": ["2.ln_f.weight"]},
    "optim-pp01-dp01.pt": {"keys": ["2.ln_f.bias"]},
    "rng-pp00.pt": {}, "rng-pp01.pt": {}, "trainer.pt": {}}}


def test_a_key_is_read_from_every_slice_zero_saved_of_it():
    assert plan_reads(ZERO, "optim-", ["1.ln_1.weight"]) == {"optim-pp00-dp00.pt": {"1.ln_1.weight"},
                                                              "optim-pp00-dp01.pt": {"1.ln_1.weight"}}
    assert plan_reads(ZERO, "optim-", ["0.wte.weight", "2.ln_f.bias"]) == {"optim-pp00-dp00.pt": {"0.wte.weight"},
                                                                           "optim-pp01-dp01.pt": {"2.ln_f.bias"}}
    stage0 = ["0.wte.weight", "1.ln_1.weight", "1.ln_1.bias"]
    assert plan_reads(ZERO, "optim-", stage0) == {"optim-pp00-dp00.pt": {"0.wte.weight", "1.ln_1.weight"},
                                                  "optim-pp00-dp01.pt": {"1.ln_1.weight", "1.ln_1.bias"}}
    assert plan_reads(ZERO, "optim-", ["3.lm_head.weight"], TIED) == {"optim-pp00-dp00.pt": {"0.wte.weight"}}


def test_a_checkpoint_newer_than_this_plait_is_refused(tmp_path):
    _, _, path = _save(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": checkpoint.FORMAT + 1}))
    fresh, fresh_opt = _engine(2)
    with pytest.raises(ConfigError) as e:
        restore_training_state(path, fresh, fresh_opt)
    assert str(e.value) == (f"checkpoint {path} is format {checkpoint.FORMAT + 1}, newer than this plait reads "
                            f"({checkpoint.FORMAT}); load it with the plait version that wrote it, or a newer one")


def test_checkpoint_timeout_option():
    assert load_config().output.checkpoint_timeout == 600.0
    args = build_parser().parse_args(["train", "--checkpoint-timeout", "1800"])
    assert _config_from(args).output.checkpoint_timeout == 1800.0
    for bad, allowed in (("0", "> 0.0"), ("-5", "> 0.0"), ("nan", "a finite number > 0.0 and <= 604800.0"),
                         ("1e6", "<= 604800.0")):
        with pytest.raises(ConfigError) as e:
            load_config(None, {"output.checkpoint_timeout": bad})
        assert str(e.value) == (f"invalid output.checkpoint_timeout = {float(bad)!r}: must be {allowed} "
                                f"(--checkpoint-timeout)")
    assert checkpoint_group(600.0) is None  # one process: no group, and no waits


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


def test_checkpoint_files_follow_the_umask(tmp_path):
    # safetensors writes 0600 by itself; every file of a checkpoint gets what open() would give.
    before = os.umask(0o027)
    try:
        _, _, path = _save(tmp_path, 1)
    finally:
        os.umask(before)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in path.iterdir()} == {
        "model-pp00.safetensors": "0o640", "optim-pp00.pt": "0o640", "rng-pp00.pt": "0o640",
        "trainer.pt": "0o640", "manifest.json": "0o640"}
