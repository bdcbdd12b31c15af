"""plait export of a dp=2 x pp=2 run: the files one process's run exports, the tied head stored once."""

import json

import torch
from safetensors import safe_open

from plait.export import export_hf, export_safetensors, load_exported
from tests.distributed.runs import assert_same_model

HEAD, WTE = "3.lm_head.weight", "0.wte.weight"  # runs.ARGS: --n-layer 2, so the head is layer 3


def _read(path):
    """A safetensors file's metadata and tensors."""
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}


def quiet(*_args, **_kwargs):
    pass


def test_safetensors_export_of_a_pipelined_run_is_one_process_export(hybrid_run, single_run, tmp_path):
    one = export_safetensors(single_run, tmp_path / "one.safetensors")
    hybrid = export_safetensors(hybrid_run, tmp_path / "hybrid.safetensors")
    (one_meta, one_tensors), (hybrid_meta, hybrid_tensors) = _read(one), _read(hybrid)
    assert hybrid_meta == one_meta  # format, config and the tie
    assert json.loads(hybrid_meta["tied"]) == {HEAD: WTE}
    assert hybrid_tensors.keys() == one_tensors.keys() and HEAD not in hybrid_tensors
    assert {t.dtype for t in hybrid_tensors.values()} == {torch.float64}  # runs.ARGS: --dtype float64
    assert_same_model(one_tensors, hybrid_tensors)  # to 1e-9
    # Same keys, shapes, dtypes and metadata: the same header, so the same size to the byte.
    assert hybrid.stat().st_size == one.stat().st_size
    layers = load_exported(hybrid)
    assert layers[-1].lm_head.weight is layers[0].wte.weight


def test_hf_export_of_a_pipelined_run_is_one_process_export(hybrid_run, single_run, tmp_path):
    one = export_hf(single_run, tmp_path / "one", log=quiet)
    hybrid = export_hf(hybrid_run, tmp_path / "hybrid", log=quiet)
    assert sorted(p.name for p in hybrid.iterdir()) == sorted(p.name for p in one.iterdir())
    assert (hybrid / "config.json").read_text() == (one / "config.json").read_text()
    assert json.loads((hybrid / "config.json").read_text())["tie_word_embeddings"] is True
    (one_meta, one_tensors), (hybrid_meta, hybrid_tensors) = (_read(d / "model.safetensors") for d in (one, hybrid))
    assert hybrid_meta == one_meta == {"format": "pt"}
    assert hybrid_tensors.keys() == one_tensors.keys() and "lm_head.weight" not in hybrid_tensors
    assert_same_model(one_tensors, hybrid_tensors)
    assert (hybrid / "model.safetensors").stat().st_size == (one / "model.safetensors").stat().st_size
