import pytest
import torch
from torch import nn

from plait.engine import Engine
from plait.model import GPTConfig, build_gpt, gpt_loss

CFG = GPTConfig(vocab_size=61, block_size=8, n_layer=2, n_head=2, n_embd=16)


def _batch(seed=0, rows=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, CFG.vocab_size, (rows, CFG.block_size), generator=g),
            torch.randint(0, CFG.vocab_size, (rows, CFG.block_size), generator=g))


@pytest.mark.parametrize("microbatches", [1, 2, 4, 8])
def test_micro_batches_give_the_whole_batch_gradient(microbatches):
    x, y = _batch()
    reference = [layer.double() for layer in build_gpt(CFG, seed=0)]
    ref_loss = gpt_loss(nn.Sequential(*reference)(x), y)
    ref_loss.backward()
    layers = [layer.double() for layer in build_gpt(CFG, seed=0)]
    engine = Engine(layers, gpt_loss, microbatches=microbatches)
    loss = engine.train_step(x, y)
    assert abs(loss - ref_loss.item()) < 1e-12
    for (name, p), q in zip(engine.named_parameters(), nn.Sequential(*reference).parameters()):
        assert (p.grad - q.grad).abs().max().item() < 1e-12, name


def test_batch_that_does_not_split_is_refused():
    engine = Engine(build_gpt(CFG, seed=0), gpt_loss, microbatches=3)
    with pytest.raises(ValueError, match="a batch of 8 rows does not split into 3 micro-batches"):
        engine.train_step(*_batch())


def test_clip_grad_norm_matches_torch():
    x, y = _batch()
    a = [layer.double() for layer in build_gpt(CFG, seed=0)]
    b = [layer.double() for layer in build_gpt(CFG, seed=0)]
    engine = Engine(a, gpt_loss)
    engine.train_step(x, y)
    gpt_loss(nn.Sequential(*b)(x), y).backward()
    ours = engine.clip_grad_norm_(0.1)
    theirs = torch.nn.utils.clip_grad_norm_(nn.Sequential(*b).parameters(), 0.1).item()
    assert abs(ours - theirs) < 1e-12 and ours > 0.1
    for p, q in zip(engine.parameters(), nn.Sequential(*b).parameters()):
        assert (p.grad - q.grad).abs().max().item() < 1e-14


def test_state_dict_keys_are_those_of_the_sequential():
    layers = build_gpt(CFG, seed=0)
    assert list(Engine(layers, gpt_loss).state_dict()) == list(nn.Sequential(*layers).state_dict())


def test_eval_step_is_the_loss_without_gradients():
    x, y = _batch()
    layers = [layer.double() for layer in build_gpt(CFG, seed=0)]
    engine = Engine(layers, gpt_loss, microbatches=2)
    loss = engine.eval_step(x, y)
    assert abs(loss - gpt_loss(nn.Sequential(*layers)(x), y).item()) < 1e-12
    assert all(p.grad is None for p in engine.parameters())


def test_meta_layers_on_one_process_are_build_gpt_with_the_head_tied():
    from plait.model import gpt_init

    layers = build_gpt(CFG, seed=4, device="meta")
    engine = Engine(layers, gpt_loss, None, init=gpt_init(CFG, 4), device="cpu")
    assert layers[-1].lm_head.weight is layers[0].wte.weight  # one Parameter, as build_gpt's
    want = nn.Sequential(*build_gpt(CFG, seed=4)).state_dict()
    got = engine.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert len(list(engine.parameters())) == len(list(nn.Sequential(*build_gpt(CFG)).parameters()))


def test_meta_layers_without_an_initialiser_are_refused():
    with pytest.raises(ValueError, match="need an initialiser"):
        Engine(build_gpt(CFG, device="meta"), gpt_loss, None)


def test_meta_layers_cannot_be_profiled():
    from plait.model import gpt_init

    with pytest.raises(ValueError, match="'profile' times real layers"):
        Engine(build_gpt(CFG, device="meta"), gpt_loss, None, partition_method="profile", init=gpt_init(CFG))


def test_generate_in_one_process_is_generate_on_the_sequential():
    from plait.model import generate

    layers = [layer.double() for layer in build_gpt(CFG, seed=6)]
    engine = Engine(layers, gpt_loss, None, microbatches=2)
    prompt = torch.tensor([[3, 1, 4], [1, 5, 9]])
    got = engine.generate(prompt, 10, CFG.block_size, generator=torch.Generator().manual_seed(2))
    want = generate(nn.Sequential(*layers), prompt, 10, CFG.block_size, generator=torch.Generator().manual_seed(2))
    assert got.shape == (2, 13) and torch.equal(got, want)


def test_train_step_sets_train_mode_only_after_eval_mode(monkeypatch):
    # [Note: host time per step] train() walks every module; the step calls it only when needed.
    cfg = GPTConfig(vocab_size=61, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.1)
    engine = Engine(build_gpt(cfg, seed=0), gpt_loss)
    calls = []
    real = nn.Module.train
    monkeypatch.setattr(nn.Module, "train", lambda self, mode=True: calls.append(mode) or real(self, mode))
    x, y = _batch()
    engine.train_step(x, y)
    engine.train_step(x, y)
    assert calls == [] and engine.module.training
    engine.eval_step(x, y)
    assert not any(m.training for m in engine.module.modules())
    calls.clear()
    engine.train_step(x, y)
    assert calls[0] is True and all(m.training for m in engine.module.modules())
