"""plait export: a plait safetensors file, and a Hugging Face GPT-2 folder that transformers loads."""

import os
import shutil

import pytest
import torch
from torch import nn

from plait.checkpoint import latest_checkpoint, load_checkpoint
from plait.cli import main
from plait.config_file import load_config
from plait.data.corpus import prepare
from plait.export import export_hf, export_safetensors, load_exported
from plait.model.gpt import build_gpt
from plait.train import train
from tests.gpu_files import saved_as_cuda

transformers = pytest.importorskip("transformers")

TINY = {"parallel.dp": 1, "parallel.pp": 1, "parallel.num_microbatches": 1, "model.n_layer": 2,
        "model.n_embd": 32, "model.n_head": 2, "train.seq_len": 32, "train.steps": 2, "train.global_batch": 4,
        "train.eval_batches": 1, "train.sample_tokens": 0, "output.progress": False}


def quiet(*_args, **_kwargs):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Two trained runs: "tied" (the defaults, BPE) and "untied" (separate head, byte tokenizer)."""
    root = tmp_path_factory.mktemp("export-runs")
    found = {}
    for name, extra in [("tied", {}), ("untied", {"model.tie_embeddings": False, "data.tokenizer": "byte"})]:
        cfg = load_config(None, {**TINY, "data.data_dir": data_dir, "output.out": str(root / name), **extra})
        found[name] = train(cfg, log=quiet).run_dir
    return found


def plait_model(run_dir) -> nn.Sequential:
    """The model as plait itself rebuilds it from the newest checkpoint."""
    state = load_checkpoint(latest_checkpoint(run_dir))["model"]
    cfg = load_config(run_dir / "config.toml")
    model = nn.Sequential(*build_gpt(cfg.model.gpt(state["0.wte.weight"].shape[0])))
    model.load_state_dict(state)
    return model.eval()


def random_tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


def test_safetensors_round_trip_is_bit_identical(runs, tmp_path):
    reference = plait_model(runs["tied"])
    out = export_safetensors(runs["tied"], tmp_path / "model.safetensors")
    layers = load_exported(out)
    assert layers[-1].lm_head.weight is layers[0].wte.weight  # the tie survives the file
    idx = random_tokens(layers[0].wte.num_embeddings)
    with torch.no_grad():
        assert torch.equal(nn.Sequential(*layers).eval()(idx), reference(idx))


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_hf_logits_match_plait(runs, tmp_path, name):
    reference = plait_model(runs[name])
    out = export_hf(runs[name], tmp_path / "hf", log=quiet)
    model, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tied = name == "tied"
    assert (model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()) == tied
    assert model.config.tie_word_embeddings == tied
    # The tokenizer's vocabulary: the byte run's model pads 257 to 320 rows, which the export drops.
    assert (model.config.vocab_size, reference[0].wte.num_embeddings) == ((2048, 2048) if tied else (257, 320))
    idx = random_tokens(model.config.vocab_size)
    with torch.no_grad():
        ours, theirs = reference(idx)[..., :model.config.vocab_size], model(idx).logits
    assert theirs.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_hf_tokenizer_encodes_as_plait(runs, tmp_path):
    cfg = load_config(runs["tied"] / "config.toml")
    ours = prepare(cfg.data.data, cfg.data.data_dir, vocab_size=cfg.data.vocab_size).tokenizer
    out = export_hf(runs["tied"], tmp_path / "hf", log=quiet)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "The quick brown fox jumps over the lazy dog.<|endoftext|>  def f(x): return x ** 2\n"
    assert theirs.encode(text) == ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text
    assert theirs.eos_token_id == ours.eot_id == transformers.AutoConfig.from_pretrained(out).eos_token_id


def test_byte_tokenizer_run_writes_no_tokenizer_files(runs, tmp_path):
    notes = []
    out = export_hf(runs["untied"], tmp_path / "hf", log=notes.append)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert len(notes) == 1 and "no tokenizer files" in notes[0]


def test_cli_export_both_formats(runs, tmp_path, capsys):
    assert main(["export", str(runs["tied"]), str(tmp_path / "m.safetensors")]) == 0
    assert len(load_exported(tmp_path / "m.safetensors")) == 4
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    assert main(["export", str(runs["tied"]), str(tmp_path / "empty"), "--format", "hf"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'm.safetensors'} (")
    assert lines[1] == (f"wrote Hugging Face GPT-2 folder {tmp_path / 'empty'} "
                        f"(config.json, model.safetensors, tokenizer.json, tokenizer_config.json)")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_export_of_a_run_checkpointed_on_a_gpu_works_on_the_cpu(tmp_path, data_dir, capsys):
    cfg = load_config(None, {**TINY, "data.data_dir": data_dir, "output.out": str(tmp_path / "gpu-run")})
    with saved_as_cuda():  # every tensor torch.save writes is tagged cuda:0, as on a GPU
        run = train(cfg, log=quiet).run_dir
    ckpt = latest_checkpoint(run)
    with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
        torch.load(ckpt / "optim-pp00.pt", weights_only=True)  # what reading it without map_location does here
    assert main(["export", str(run), str(tmp_path / "m.safetensors")]) == 0
    assert main(["export", str(run), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert capsys.readouterr().err == ""
    reference = plait_model(run)
    idx = random_tokens(reference[0].wte.num_embeddings)
    with torch.no_grad():
        assert torch.equal(nn.Sequential(*load_exported(tmp_path / "m.safetensors")).eval()(idx), reference(idx))
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
        assert (hf(idx).logits - reference(idx)).abs().max().item() <= 1e-5


def test_cli_errors(runs, tmp_path, capsys):
    no_ckpt = tmp_path / "fresh"
    no_ckpt.mkdir()
    shutil.copy(runs["tied"] / "config.toml", no_ckpt)
    assert main(["export", str(no_ckpt), str(tmp_path / "m.safetensors")]) == 2
    assert capsys.readouterr().err == (f"plait: error: {no_ckpt}: no complete checkpoint in {no_ckpt}/checkpoints; "
                                       f"train the run until it saves one, or give another run\n")

    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "m.safetensors")]) == 2
    assert capsys.readouterr().err == (f"plait: error: {tmp_path / 'nowhere'}: no config.toml there; "
                                       f"give the directory of a plait run\n")

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["export", str(runs["tied"]), str(full), "--format", "hf"]) == 2
    assert capsys.readouterr().err == (f"plait: error: {full} exists and is not empty; give a new or empty folder, "
                                       f"or --force to replace it\n")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]

    assert main(["export", str(runs["tied"]), str(full), "--format", "onnx"]) == 2
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


def test_nothing_is_written_over_without_force(runs, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("mine")
    assert main(["export", str(runs["tied"]), str(readme)]) == 2
    assert capsys.readouterr().err == f"plait: error: {readme} exists; give --force to replace it, or a new file name\n"
    assert readme.read_text() == "mine"
    assert main(["export", str(runs["tied"]), str(readme), "--force"]) == 0
    assert len(load_exported(readme)) == 4

    hf = tmp_path / "hf"
    assert main(["export", str(runs["tied"]), str(hf), "--format", "hf"]) == 0
    first = {p.name: p.read_bytes() for p in hf.iterdir()}
    assert main(["export", str(runs["untied"]), str(hf), "--format", "hf"]) == 2
    assert capsys.readouterr().err == (f"plait: error: {hf} exists and is not empty; give a new or empty folder, "
                                       f"or --force to replace it\n")
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == first
    # --force replaces the earlier export whole: the byte run has no tokenizer files, and none are left over.
    assert main(["export", str(runs["untied"]), str(hf), "--format", "hf", "--force"]) == 0
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]
    assert transformers.AutoConfig.from_pretrained(hf).tie_word_embeddings is False
    capsys.readouterr()
    # ... and nothing else: a folder holding other files is not deleted, even with --force.
    (hf / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    assert main(["export", str(runs["tied"]), str(hf), "--format", "hf", "--force"]) == 2
    assert capsys.readouterr().err == (f"plait: error: {hf} holds files an export does not write (notes.txt); "
                                       f"--force replaces only an earlier export, give a new or empty folder\n")
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or old folder left


@pytest.fixture
def umask_027():
    before = os.umask(0o027)
    yield
    os.umask(before)


def test_exported_files_follow_the_umask(runs, tmp_path, umask_027):
    out = export_safetensors(runs["tied"], tmp_path / "m.safetensors")
    folder = export_hf(runs["tied"], tmp_path / "hf", log=quiet)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *folder.iterdir()]}
    assert modes == {"m.safetensors": 0o640, "config.json": 0o640, "model.safetensors": 0o640,
                     "tokenizer.json": 0o640, "tokenizer_config.json": 0o640}
