import math

import pytest
import torch
from torch import nn

from plait.model import PRESETS, GPTConfig, build_gpt, count_params, flops_per_token, generate, gpt_loss
from plait.model.gpt import sample_next

CFG = GPTConfig(vocab_size=97, block_size=16, n_layer=3, n_head=2, n_embd=16)


def test_layer_list_shapes():
    layers = build_gpt(CFG, seed=0)
    assert len(layers) == CFG.n_layer + 2
    x = torch.randint(0, CFG.vocab_size, (3, 11))
    h = layers[0](x)
    assert h.shape == (3, 11, CFG.n_embd)
    for block in layers[1:-1]:
        h = block(h)
        assert h.shape == (3, 11, CFG.n_embd)
    assert layers[-1](h).shape == (3, 11, CFG.vocab_size)


def test_loss_at_init_is_close_to_uniform():
    cfg = GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = nn.Sequential(*build_gpt(cfg, seed=3))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (8, 32), generator=g)
    y = torch.randint(0, cfg.vocab_size, (8, 32), generator=g)
    loss = gpt_loss(model(x), y).item()
    assert abs(loss - math.log(cfg.vocab_size)) < 0.1


@pytest.mark.parametrize("tie", [True, False])
def test_any_cut_of_the_layer_list_composes_to_the_whole(tie):
    cfg = GPTConfig(vocab_size=97, block_size=16, n_layer=3, n_head=2, n_embd=16, tie_embeddings=tie)
    layers = [layer.double() for layer in build_gpt(cfg, seed=1)]
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    whole = nn.Sequential(*layers)(x)
    for cut in range(1, len(layers)):
        first, second = nn.Sequential(*layers[:cut]), nn.Sequential(*layers[cut:])
        assert torch.equal(second(first(x)), whole)
    for a in range(1, len(layers)):  # three pieces
        for b in range(a + 1, len(layers)):
            out = nn.Sequential(*layers[b:])(nn.Sequential(*layers[a:b])(nn.Sequential(*layers[:a])(x)))
            assert torch.equal(out, whole)


def test_tied_head_shares_the_embedding_parameter():
    tied = build_gpt(CFG, seed=0)
    assert tied[-1].lm_head.weight is tied[0].wte.weight
    untied = build_gpt(GPTConfig(**{**CFG.__dict__, "tie_embeddings": False}), seed=0)
    assert untied[-1].lm_head.weight is not untied[0].wte.weight
    assert not torch.equal(untied[-1].lm_head.weight, untied[0].wte.weight)
    assert count_params(untied) - count_params(tied) == CFG.vocab_size * CFG.n_embd


def test_initialisation_is_per_layer_and_seeded():
    a, b = build_gpt(CFG, seed=5), build_gpt(CFG, seed=5)
    for la, lb in zip(a, b):
        for (na, pa), (nb, pb) in zip(la.named_parameters(), lb.named_parameters()):
            assert na == nb and torch.equal(pa, pb)
    c = build_gpt(CFG, seed=6)
    assert not torch.equal(a[1].attn.c_attn.weight, c[1].attn.c_attn.weight)
    # GPT-2's scheme: std 0.02, residual projections 0.02 / sqrt(2 n_layer), zero biases, unit LayerNorm.
    big = GPTConfig(vocab_size=1000, block_size=64, n_layer=4, n_head=4, n_embd=256)
    layers = build_gpt(big, seed=0)
    assert abs(layers[1].mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    assert abs(layers[1].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 1e-3
    assert torch.count_nonzero(layers[1].attn.c_attn.bias) == 0
    assert torch.equal(layers[1].ln_1.weight, torch.ones(256))


def test_gpt2_124m_parameter_count_matches_openai():
    n_layer, n_head, n_embd, block = PRESETS["gpt2-124m"]
    cfg = GPTConfig(vocab_size=50257, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    assert count_params(build_gpt(cfg, device="meta")) == 124_439_808  # GPT2LMHeadModel's count


def test_flops_per_token():
    # 6 x (12 L C^2 + C V) + 12 L C T
    assert flops_per_token(CFG, 16) == 6 * (3 * 12 * 16 * 16 + 16 * 97) + 12 * 3 * 16 * 16


def test_attention_is_causal():
    model = nn.Sequential(*build_gpt(CFG, seed=0)).double()
    x = torch.randint(0, CFG.vocab_size, (1, 10))
    y = x.clone()
    y[0, 7] = (x[0, 7] + 1) % CFG.vocab_size
    a, b = model(x), model(y)
    assert torch.equal(a[0, :7], b[0, :7])
    assert not torch.equal(a[0, 7], b[0, 7])


def test_generate_is_reproducible_and_respects_the_context():
    model = nn.Sequential(*build_gpt(CFG, seed=0)).eval()
    idx = torch.tensor([[1, 2, 3]])
    a = generate(model, idx, 20, CFG.block_size, generator=torch.Generator().manual_seed(0))
    b = generate(model, idx, 20, CFG.block_size, generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, 23) and torch.equal(a, b) and torch.equal(a[:, :3], idx)


def test_sampling_a_padded_vocabulary_draws_only_the_tokenizers_ids():
    # [Note: padded vocabulary] rows past the tokenizer's are no token, however likely the model makes them
    logits = torch.zeros(64, 80)
    logits[:, 70:] = 50.0
    g = torch.Generator().manual_seed(0)
    assert (sample_next(logits, generator=g) >= 70).all()  # unrestricted, the padding wins
    ids = sample_next(logits, generator=g, vocab=70)
    assert ids.shape == (64, 1) and ids.max().item() < 70 and len(ids.unique()) > 10
    model = nn.Sequential(*build_gpt(GPTConfig(vocab_size=80, block_size=8, n_layer=1, n_head=2, n_embd=16),
                                     seed=0)).eval()
    out = generate(model, torch.tensor([[1, 2]]), 30, 8, generator=g, vocab=5)
    assert out[:, 2:].max().item() < 5
