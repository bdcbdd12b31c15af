"""The backward split into I and W (plait.parallel.weight_grad) gives a plain backward's gradients.

Each test runs the same model twice from the same values: once with `loss.backward()`, once
with its nn.Linear modules deferred, the backward run inside `store.deferring(key)` (I) and
then `store.run(key)` (W). The deferred forward takes either way (`path`): the custom autograd
function, or native F.linear with a hook inside `deferred_forward()`, as the executor runs it. Gradients are compared exactly (torch.equal) wherever autograd and W
add the same terms in the same order; where they cannot, the tolerance is stated and why.
"""

import contextlib

import pytest
import torch
from torch import nn

from plait import checkpointing
from plait.engine import Engine
from plait.model import GPTConfig, build_gpt, gpt_loss
from plait.model.gpt import Block
from plait.parallel.p2p import check_plan, p2p_plan
from plait.parallel.schedule import Action, ScheduleError, simulate, validate
from plait.parallel.weight_grad import WeightGradStore, defer_linears, deferred_forward, held_inputs

CFG = GPTConfig(vocab_size=61, block_size=8, n_layer=2, n_head=2, n_embd=16, tie_embeddings=True)


PATHS = ["function", "native"]


def forward(path):
    """Where a deferred model's forward runs: as it is (the function), or in deferred_forward()."""
    return deferred_forward() if path == "native" else contextlib.nullcontext()


def tokens(seed=1, rows=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (rows, CFG.block_size), generator=g)
    return x, torch.roll(x, -1, dims=1)


def gpt(dtype, defer, mode="none"):
    layers = [layer.to(dtype) for layer in build_gpt(CFG, seed=0)]
    if defer:
        defer_linears(layers)
    checkpointing.apply(layers, mode)
    return nn.Sequential(*layers)


def grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


def split_backward(loss, store=None, key=0):
    """I then W for one micro-batch."""
    store = store or WeightGradStore()
    with store.deferring(key):
        loss.backward()
    store.run(key)


def assert_equal(ours, theirs):
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, different


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_block_defers_its_linear_weights_to_w_and_ends_bit_equal(dtype, path):
    torch.manual_seed(0)
    ref, ours = Block(CFG).to(dtype), Block(CFG).to(dtype)
    ours.load_state_dict(ref.state_dict())
    assert defer_linears([ours]) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    x = torch.randn(3, CFG.block_size, CFG.n_embd, dtype=dtype)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ref(xr) ** 2).sum().backward()
    store = WeightGradStore()
    with forward(path):
        out = ours(xo)
    with store.deferring((0, 0)):
        (out ** 2).sum().backward()
    # After I: the input gradient and the LayerNorms' are in, no linear weight's or bias's is.
    assert torch.equal(xo.grad, xr.grad)
    after_i = {name for name, p in ours.named_parameters() if p.grad is not None}
    assert after_i == {"ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"}
    assert store.pending() == [(0, 0)]
    store.run((0, 0))
    assert store.pending() == []
    assert_equal(grads(ours), grads(ref))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_whole_gpt_with_its_tied_embedding_on_one_rank_is_bit_equal(dtype, path):
    x, y = tokens()
    ref, ours = gpt(dtype, defer=False), gpt(dtype, defer=True)
    assert ours[-1].lm_head.weight is ours[0].wte.weight  # still one Parameter
    gpt_loss(ref(x), y).backward()
    store = WeightGradStore()
    with forward(path):
        loss = gpt_loss(ours(x), y)
    with store.deferring(0):
        loss.backward()
    # The tied weight's embedding share arrived in I; its LM-head share waits for W.
    wte = ours[0].wte.weight
    assert wte.grad is not None and not torch.equal(wte.grad, ref[0].wte.weight.grad)
    store.run(0)
    # autograd adds the two shares (head + embedding); I then W adds embedding + head: the same.
    assert_equal(grads(ours), grads(ref))


@pytest.mark.parametrize("path", PATHS)
def test_the_tied_weight_accumulated_over_micro_batches_differs_only_by_rounding(path):
    """Over two micro-batches autograd adds g1 + (head2 + emb2) and I/W add (g1 + emb2) + head2:
    other roundings, within 1e-15 here in float64; every untied parameter stays bit-equal."""
    ref, ours = gpt(torch.float64, defer=False), gpt(torch.float64, defer=True)
    store = WeightGradStore()
    for seed in (1, 2):
        x, y = tokens(seed)
        gpt_loss(ref(x), y).backward()
        with forward(path):
            loss = gpt_loss(ours(x), y)
        with store.deferring(seed):
            loss.backward()
    store.run(1)  # W of the first micro-batch after the second's I, as a zero-bubble schedule runs it
    store.run(2)
    mine, theirs = grads(ours), grads(ref)
    assert (mine["0.wte.weight"] - theirs["0.wte.weight"]).abs().max().item() <= 1e-15
    assert_equal({k: v for k, v in mine.items() if k != "0.wte.weight"},
                 {k: v for k, v in theirs.items() if k != "0.wte.weight"})


class Twice(nn.Module):
    """A user's layer that applies one Linear twice."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(self.norm(x))))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_linear_used_twice_gets_both_uses_summed_as_autograd_sums_them(dtype, path):
    torch.manual_seed(0)
    ref, ours = Twice().to(dtype), Twice().to(dtype)
    ours.load_state_dict(ref.state_dict())
    defer_linears([ours])
    x = torch.randn(4, 5, 8, dtype=dtype)
    ref(x).square().sum().backward()
    with forward(path):
        loss = ours(x).square().sum()
    split_backward(loss)
    assert_equal(grads(ours), grads(ref))


class InPlace(nn.Module):
    """A user's layer that modifies a Linear's output in place before the next op."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        h.mul_(3.0)
        h.add_(1.0)
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("path", PATHS)
def test_an_output_modified_in_place_defers_the_gradient_of_the_layers_own_output(path):
    """The W of `a` needs the gradient with respect to a's output as a made it, not as mul_ left
    it (3 times smaller): the hook, registered before the in-place ops, gets that one."""
    torch.manual_seed(0)
    ref, ours = InPlace().double(), InPlace().double()
    ours.load_state_dict(ref.state_dict())
    defer_linears([ours])
    x = torch.randn(4, 8, dtype=torch.float64)
    ref(x.clone().requires_grad_()).square().sum().backward()
    with forward(path):
        loss = ours(x.clone().requires_grad_()).square().sum()
    split_backward(loss)
    assert_equal(grads(ours), grads(ref))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_blocks_recompute_in_i_and_w_keeps_what_it_needs(mode, path):
    x, y = tokens()
    ref, ours = gpt(torch.float64, defer=False), gpt(torch.float64, defer=True, mode=mode)
    gpt_loss(ref(x), y).backward()
    with forward(path):
        loss = gpt_loss(ours(x), y)
    split_backward(loss)
    assert_equal(grads(ours), grads(ref))


def test_a_checkpointed_linear_layer_is_not_deferred_and_gets_its_gradients_in_i():
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)]
    ref = [nn.Linear(8, 8) for _ in layers]
    for a, b in zip(ref, layers):
        b.load_state_dict(a.state_dict())
    checkpointing.apply(layers, "full")  # the middle one
    assert defer_linears(layers) == 2
    assert [checkpointing.mode_of(m) for m in layers] == ["none", "full", "none"]
    assert [bool(m.__dict__.get("_plait_deferred")) for m in layers] == [True, False, True]
    x = torch.randn(4, 8)
    nn.Sequential(*ref)(x).sum().backward()
    model, store = nn.Sequential(*layers), WeightGradStore()
    with store.deferring(0):
        model(x).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["1.weight", "1.bias"]
    store.run(0)
    assert_equal(grads(nn.Sequential(*layers)), grads(nn.Sequential(*ref)))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_under_engine_checkpointing_only_the_layers_outside_it_defer(mode):
    """The Engine checkpoints before it defers: the blocks' Linears stay whole in I, the LM head
    (outside checkpointing) defers. [Note: checkpointing and the split]"""
    layers = build_gpt(CFG, seed=0)
    checkpointing.apply(layers, mode)
    assert defer_linears(layers) == 1
    deferred = [name for name, m in nn.Sequential(*layers).named_modules() if m.__dict__.get("_plait_deferred")]
    assert deferred == [f"{len(layers) - 1}.lm_head"]


@pytest.mark.parametrize("path", PATHS)
def test_under_bf16_autocast_the_gpt_is_bit_equal_to_autocasts_own_backward(path):
    """The products run in bfloat16 as autocast's F.linear runs them and the weight gradients
    are cast back to float32 as autocast's cast backward does: the same numbers."""
    x, y = tokens()
    ref, ours = gpt(torch.float32, defer=False), gpt(torch.float32, defer=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref = gpt_loss(ref(x), y)
    with torch.autocast("cpu", dtype=torch.bfloat16), forward(path):
        loss = gpt_loss(ours(x), y)
    assert torch.equal(loss, loss_ref)
    loss_ref.backward()
    split_backward(loss)
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters())
    assert_equal(grads(ours), grads(ref))


@pytest.mark.parametrize("path", PATHS)
def test_under_bf16_autocast_a_linear_used_twice_sums_its_uses_in_float32(path):
    """autocast casts a weight once per region, so autograd sums its two uses' gradients in
    bfloat16 before casting; W casts each use's gradient to float32 and sums there. The results
    differ by bfloat16 rounding (8 bits of mantissa): within 2^-7 of the largest gradient."""
    torch.manual_seed(0)
    ref, ours = Twice(), Twice()
    ours.load_state_dict(ref.state_dict())
    defer_linears([ours])
    x = torch.randn(4, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref = ref(x).float().square().sum()
        with forward(path):
            loss = ours(x).float().square().sum()
    loss_ref.backward()
    split_backward(loss)
    for name, p in ours.named_parameters():
        want = dict(ref.named_parameters())[name].grad
        assert (p.grad - want).abs().max().item() <= 2 ** -7 * want.abs().max().item(), name


def test_without_a_store_deferring_the_deferred_forward_is_a_plain_backward():
    """B actions, one process, evaluation: nothing is queued, every gradient arrives at once."""
    x, y = tokens()
    ref, ours = gpt(torch.float32, defer=False), gpt(torch.float32, defer=True)
    gpt_loss(ref(x), y).backward()
    gpt_loss(ours(x), y).backward()
    assert_equal(grads(ours), grads(ref))
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_a_native_deferred_forward_whose_backward_is_not_an_i_raises_instead_of_losing_gradients():
    x, y = tokens()
    ours = gpt(torch.float32, defer=True)
    with deferred_forward():
        loss = gpt_loss(ours(x), y)
    with pytest.raises(RuntimeError, match=r"^a linear layer's forward ran inside deferred_forward\(\) but its "
                                           r"backward runs outside a WeightGradStore's deferring\(\): its weight "
                                           r"gradient would be lost$"):
        loss.backward()


def test_the_native_forward_saves_no_layer_input_and_holds_each_for_w_until_w():
    """Autograd saves for a detached weight's product only what the input gradient needs (the
    weight), so the inputs W needs are held by the hooks, then by the queue, and listed by
    `held_inputs` until W has run: the same tensors the function saves for backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    defer_linears([model])
    x = torch.randn(4, 8, requires_grad=True)
    before = {id(t) for t in held_inputs()}  # other tests' graphs may still hold some

    def ours():
        return [t for t in held_inputs() if id(t) not in before]

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with deferred_forward():
            loss = model(x).sum()
    # Saved: the two weights (for the input gradients) and tanh's output (for its own); not x.
    storages = {t.untyped_storage().data_ptr() for t in saved}
    weights = {model[0].weight.data_ptr(), model[2].weight.data_ptr()}
    assert weights <= storages and len(storages) == 3 and x.data_ptr() not in storages
    hidden = model[1](model[0](x)).detach()  # the second layer's input, recomputed to compare
    assert len(ours()) == 2 and ours()[0] is x and torch.equal(ours()[1], hidden)
    store = WeightGradStore()
    with store.deferring(0):
        loss.backward()
    del loss, saved
    assert len(ours()) == 2  # the queue holds them for W
    assert [t for t in store.held() if t is x] == [x] and len(store.held()) == 4  # inputs and output gradients
    store.run(0)
    assert ours() == [x] and store.held() == []  # only x, the test's own, lives on


@pytest.mark.parametrize("path", PATHS)
def test_w_gradients_go_where_the_store_says(path):
    x, y = tokens()
    model = gpt(torch.float64, defer=True)
    got = []
    store = WeightGradStore(accumulate=lambda p, g: got.append((p, g)))
    with forward(path):
        loss = gpt_loss(model(x), y)
    with store.deferring(0):
        loss.backward()
    store.run(0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    expected = [p for m in linears for p in (m.weight, m.bias) if p is not None]
    assert sorted(map(id, (p for p, _ in got))) == sorted(map(id, expected))  # each once
    assert all(p.grad is None for m in linears[:-1] for p in (m.weight, m.bias))


def acts(text):
    return [Action(int(t[0]), int(t[2:]), t[1]) for t in text.split()]


def test_schedules_with_i_and_w_validate_simulate_and_plan():
    # 1F1B with each B split, the first stage's W delayed after later F and I.
    schedule = {0: acts("0F0 0F1 0I0 0F2 0I1 0W0 0F3 0I2 0W1 0I3 0W2 0W3"),
                1: acts("1F0 1I0 1W0 1F1 1I1 1W1 1F2 1I2 1W2 1F3 1I3 1W3")}
    sim = simulate(schedule, 2, 4, forward_cost=1, backward_cost=2)
    plan = p2p_plan(schedule, 2, 4)
    check_plan(schedule, plan, 2)
    # Stage 0's I of micro-batch 0 waits for stage 1's I (not a B) of it: F 1, F 1, I 1 on the
    # last stage then send; rank 0 starts 0I0 at 3 (after its 0F1 ends at 2 and 1I0 at 3).
    start = {a: s for s, _, a in sim.timeline[0]}
    assert start[Action(0, 0, "I")] == 3.0
    assert sim.peak_in_flight == {0: 3, 1: 1}
    # Mixed: a B on one micro-batch and I/W on another.
    validate({0: acts("0F0 0F1 0B0 0I1 0W1"), 1: acts("1F0 1I0 1W0 1F1 1B1")}, 2, 2)


@pytest.mark.parametrize("line", ["0F0 0I0 0F1 0I1 0W1 0W0", "0F0 0F1 0I0 0B1 0W0", "0F0 0I0 0W0 0F1 0I1 0W1"])
def test_an_engine_runs_i_and_w_actions_to_the_whole_batch_gradient(line):
    x, y = tokens(rows=8)
    ref = gpt(torch.float64, defer=False)
    loss_ref = gpt_loss(ref(x), y)
    loss_ref.backward()
    layers = [layer.double() for layer in build_gpt(CFG, seed=0)]
    engine = Engine(layers, gpt_loss, schedule={0: acts(line)}, microbatches=2)
    assert engine.split_backward
    loss = engine.train_step(x, y)
    assert abs(loss - loss_ref.item()) <= 1e-12
    theirs = dict(ref.named_parameters())
    for name, p in engine.named_parameters():
        assert (p.grad - theirs[name].grad).abs().max().item() <= 1e-12, name


def vacts(text):
    """Actions written stage:kind:micro-batch, e.g. "1:I:0"."""
    return [Action(int(s), int(i), k) for s, k, i in (t.split(":") for t in text.split())]


@pytest.mark.parametrize("line", [
    # One rank holding two stages, as a V layout's first rank holds the first and the last: the tied
    # embedding (stage 0) and LM head (stage 1) are one Parameter, its shares arriving in 0's I and 1's W.
    "0:F:0 1:F:0 1:I:0 0:I:0 1:W:0 0:W:0 0:F:1 1:F:1 1:I:1 1:W:1 0:I:1 0:W:1",
    "0:F:0 1:F:0 0:F:1 1:F:1 1:I:0 0:I:0 1:I:1 0:I:1 1:W:1 0:W:0 1:W:0 0:W:1",
    "0:F:0 1:F:0 1:B:0 0:I:0 0:F:1 1:F:1 1:I:1 0:B:1 1:W:1 0:W:0",
])
def test_two_stages_on_one_rank_with_the_tied_weight_in_both(line):
    x, y = tokens(rows=8)
    ref = gpt(torch.float64, defer=False)
    loss_ref = gpt_loss(ref(x), y)
    loss_ref.backward()
    layers = [layer.double() for layer in build_gpt(CFG, seed=0)]
    engine = Engine(layers, gpt_loss, schedule={0: vacts(line)}, microbatches=2, virtual_stages=2)
    assert engine.stage_ids == [0, 1] and engine.layers[CFG.n_layer + 1].lm_head.weight is engine.layers[0].wte.weight
    loss = engine.train_step(x, y)
    assert abs(loss - loss_ref.item()) <= 1e-12
    theirs = dict(ref.named_parameters())
    for name, p in engine.named_parameters():
        assert (p.grad - theirs[name].grad).abs().max().item() <= 1e-12, name


UNTIED = GPTConfig(vocab_size=61, block_size=8, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False)


@pytest.mark.parametrize("autocast,checkpoint", [(torch.bfloat16, "none"), (None, "full"), (None, "selective"),
                                                 (torch.bfloat16, "selective")])
def test_an_engine_with_i_and_w_is_bit_equal_to_the_same_order_with_b(autocast, checkpoint):
    """Through the Engine, under bf16 autocast and activation checkpointing: each W adds what its
    B would have added, in the same order (no weight here is shared with a module of I)."""
    x, y = tokens(rows=8)

    def run(line):
        layers = build_gpt(UNTIED, seed=0)
        engine = Engine(layers, gpt_loss, schedule={0: acts(line)}, microbatches=2, autocast_dtype=autocast,
                        activation_checkpointing=checkpoint)
        from plait.trace import Recorder

        engine.executor.recorder = Recorder(steps={0}, step=0)
        loss = engine.train_step(x, y)
        kinds = [e.kind for e in engine.executor.recorder.events]
        return loss, {n: p.grad for n, p in engine.named_parameters()}, kinds

    loss_b, grads_b, kinds_b = run("0F0 0B0 0F1 0B1")
    loss_iw, grads_iw, kinds_iw = run("0F0 0I0 0F1 0I1 0W0 0W1")
    assert loss_iw == loss_b
    assert_equal(grads_iw, grads_b)
    assert (kinds_b, kinds_iw) == (["F", "B", "F", "B"], ["F", "I", "F", "I", "W", "W"])


def test_an_engine_refuses_an_action_list_that_misses_a_w():
    with pytest.raises(ScheduleError, match="missing 0W1 on rank 0"):
        Engine(build_gpt(CFG, seed=0), gpt_loss, schedule={0: acts("0F0 0I0 0W0 0F1 0I1")}, microbatches=2)


def test_i_and_w_accumulate_over_steps_without_zero_grad():
    ref = gpt(torch.float64, defer=False)
    layers = [layer.double() for layer in build_gpt(CFG, seed=0)]
    engine = Engine(layers, gpt_loss, schedule={0: acts("0F0 0F1 0I0 0I1 0W1 0W0")}, microbatches=2)
    for seed in (1, 2):
        x, y = tokens(seed, rows=8)
        gpt_loss(ref(x), y).backward()
        engine.train_step(x, y)
    theirs = dict(ref.named_parameters())
    for name, p in engine.named_parameters():
        assert (p.grad - theirs[name].grad).abs().max().item() <= 1e-12, name
