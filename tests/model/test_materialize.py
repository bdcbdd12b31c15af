"""Meta-device layers materialised one at a time get build_gpt's values exactly."""

import dataclasses

import pytest
import torch

from plait.model import GPTConfig, build_gpt, gpt_init, is_meta, materialize

CFG = GPTConfig(vocab_size=97, block_size=16, n_layer=3, n_head=2, n_embd=16)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_layer_alone_gets_build_gpt_values(tie, dtype):
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    want = [layer.to(dtype) for layer in build_gpt(cfg, seed=5)]
    for j in range(cfg.n_layer + 2):  # one layer at a time, as a pipeline rank holding only it would
        layers = [layer.to(dtype) for layer in build_gpt(cfg, seed=5, device="meta")]
        materialize(layers, [j], gpt_init(cfg, 5), "cpu")
        got, ref = layers[j].state_dict(), want[j].state_dict()
        assert got.keys() == ref.keys()
        for key in ref:
            assert got[key].dtype == dtype and torch.equal(got[key], ref[key]), (j, key)
        assert all(is_meta(layer) for i, layer in enumerate(layers) if i != j)


def test_a_weight_shared_by_two_materialised_layers_stays_one_parameter():
    layers = build_gpt(CFG, seed=1, device="meta")
    real = materialize(layers, range(len(layers)), gpt_init(CFG, 1), "cpu")
    assert layers[-1].lm_head.weight is layers[0].wte.weight
    assert not layers[0].wte.weight.is_meta
    assert len(set(real.values())) == len({p for layer in layers for p in layer.parameters()})


def test_a_tied_head_alone_holds_the_embedding_values():
    layers = build_gpt(CFG, seed=2, device="meta")
    materialize(layers, [CFG.n_layer + 1], gpt_init(CFG, 2), "cpu")
    assert torch.equal(layers[-1].lm_head.weight, build_gpt(CFG, seed=2)[0].wte.weight)
    assert layers[0].wte.weight.is_meta
