"""Pipeline parallelism is exact: every schedule ends where one process on the whole batch ends,
and its gradients are torch.distributed.pipelining's for the same schedule and stages."""

import pytest
import torch
from torch import nn

import plait
from plait import distributed
from plait.model import GPTConfig, build_gpt, gpt_loss
from plait.parallel.p2p import p2p_plan
from plait.parallel.schedule import make_schedule, rank_stages, schedule_layout
from tests.distributed.harness import spawn, train_one_process

CFG = GPTConfig(vocab_size=61, block_size=8, n_layer=6, n_head=2, n_embd=16, tie_embeddings=False)
STEPS = 2


def global_batch(step, rows):
    g = torch.Generator().manual_seed(300 + step)
    x = torch.randint(0, CFG.vocab_size, (rows, CFG.block_size), generator=g)
    return x, torch.roll(x, -1, dims=1)


def layouts(pp):
    """(schedule, micro-batches, virtual stages) to check for `pp` stages."""
    out = [(name, m, 1) for name in ("gpipe", "1f1b", "zb1p") for m in (1, pp, 2 * pp + 1)]
    return (out + [("interleaved-1f1b", m, 2) for m in (pp, 2 * pp)] + [("zbv", m, 2) for m in (1, pp, 2 * pp)]
            + [("dualpipev", 2 * pp, 2)])  # (dualpipev needs 2pp micro-batches at least)


def make_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def reference(m, steps=STEPS):
    """One process, the whole batch of 2 * m rows each step, float64."""
    layers = [layer.double() for layer in build_gpt(CFG, seed=0)]
    batches = (global_batch(step, 2 * m) for step in range(steps))
    return train_one_process(layers, batches, gpt_loss, make_optimizer)


def torch_accepts(schedule, m, pp):
    """torch's Schedule1F1B refuses fewer micro-batches than stages, ours runs them; zb1p is
    compared with torch's ScheduleInterleavedZeroBubble on one stage per rank, which needs a
    multiple of pp micro-batches (ours runs any number)."""
    return not ((schedule == "1f1b" and m < pp) or (schedule == "zb1p" and m % pp))


def torch_pipelining_grads(schedule, m, virtual, bounds):
    """One step of torch's own pipelining on the same stages; this rank's gradients by name."""
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleGPipe,
                                              ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble,
                                              ScheduleZBVZeroBubble)

    pp, rank = distributed.world_size(), distributed.rank()
    layers = [layer.double() for layer in build_gpt(CFG, seed=0)]
    stage_ids = rank_stages(rank, pp, virtual, schedule_layout(schedule))
    stages = [PipelineStage(nn.Sequential(*layers[bounds[s]:bounds[s + 1]]), s, pp * virtual, torch.device("cpu"))
              for s in stage_ids]
    if schedule in ("interleaved-1f1b", "zb1p", "zbv", "dualpipev"):
        cls = {"interleaved-1f1b": ScheduleInterleaved1F1B, "zb1p": ScheduleInterleavedZeroBubble,
               "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}[schedule]
        runner = cls(stages, m, loss_fn=gpt_loss)
    else:
        runner = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule](stages[0], m, loss_fn=gpt_loss)
    x, y = global_batch(0, 2 * m)
    kwargs = {}
    if pp * virtual - 1 in stage_ids:  # the loss's rank: the last under the loop layout, the first under a V
        kwargs = {"target": y, "losses": []}
    runner.step(x, **kwargs) if rank == 0 else runner.step(**kwargs)
    return {f"{j}.{name}": p.grad.clone() for s in stage_ids for j in range(bounds[s], bounds[s + 1])
            for name, p in layers[j].named_parameters()}


def train_pp(lead=None, compare_with_torch=True):
    pp = distributed.world_size()
    mesh = plait.make_mesh(dp=1, pp=pp)
    out = []
    for schedule, m, virtual in layouts(pp):
        layers = [layer.double() for layer in build_gpt(CFG, seed=0)]
        # dualpipev's two stages per rank left to the Engine: a V's only count.
        engine = plait.Engine(layers, gpt_loss, mesh, schedule=schedule, microbatches=m,
                              virtual_stages=None if schedule == "dualpipev" else virtual)
        assert len(engine.stage_ids) == virtual
        if lead is not None:  # another plan than the one for this backend
            engine.executor.lead = lead
            engine.train_plan = p2p_plan(make_schedule(schedule, pp, m, virtual), pp, m, virtual, lead,
                                         schedule_layout(schedule))[distributed.rank()]
        opt = make_optimizer(engine.parameters())
        losses, first_grads = [], None
        for step in range(STEPS):
            losses.append(engine.train_step(*global_batch(step, 2 * m)))
            if step == 0:
                first_grads = {k: p.grad.clone() for k, p in engine.named_parameters()}
            opt.step()
            opt.zero_grad()
        theirs = (torch_pipelining_grads(schedule, m, virtual, engine.partition.bounds)
                  if compare_with_torch and torch_accepts(schedule, m, pp) else None)
        out.append({"state": {k: v.clone() for k, v in engine.state_dict().items()}, "losses": losses,
                    "grads": first_grads, "torch_grads": theirs, "actions": [str(a) for a in engine.train_actions],
                    "windows": [(str(a), start, end) for a, start, end in engine.executor.action_windows()],
                    "seconds": [seconds for _, seconds in engine.executor.action_seconds()]})
    return out


def assert_each_layout_equals_one_process(ranks, pp):
    """Every layout's parameters after STEPS steps (float64, 1e-9) and every rank's losses."""
    for n, (schedule, m, _) in enumerate(layouts(pp)):
        ref_state, ref_losses = reference(m)
        state = {}
        for r in ranks:
            state.update(r[n]["state"])
        assert state.keys() == ref_state.keys()  # every layer is held by exactly one rank
        for key, want in ref_state.items():
            diff = (state[key] - want).abs().max().item()
            assert diff <= 1e-9, (schedule, m, key, diff)
        for r in ranks:
            assert max(abs(a - b) for a, b in zip(r[n]["losses"], ref_losses)) <= 1e-12, (schedule, m)


@pytest.mark.parametrize("pp", [2, 4])
def test_every_schedule_equals_one_process_and_torch_pipelining(pp):
    ranks = spawn(train_pp, pp, timeout=300)
    assert_each_layout_equals_one_process(ranks, pp)
    for r in ranks:
        for layout in r:  # the last step's compute actions as they ran: the rank's order, one after another
            assert [a for a, _, _ in layout["windows"]] == layout["actions"]
            ends = [t for _, start, end in layout["windows"] for t in (start, end)]
            assert ends == sorted(ends)
            assert [end - start for _, start, end in layout["windows"]] == layout["seconds"]
    for n, (schedule, m, _) in enumerate(layouts(pp)):
        for r in ranks:
            if not torch_accepts(schedule, m, pp):
                assert r[n]["torch_grads"] is None
                continue
            assert r[n]["grads"].keys() == r[n]["torch_grads"].keys()
            for key, g in r[n]["grads"].items():
                diff = (g - r[n]["torch_grads"][key]).abs().max().item()
                assert diff <= 1e-12, (schedule, m, key, diff)


@pytest.mark.parametrize("pp", [2, 4])
def test_the_in_order_plan_runs_every_schedule_exactly(pp):
    """The plan NCCL gets (lead 0: receives in lockstep with their sends, no early posting)
    runs every schedule to the same parameters as one process, here on gloo."""
    assert_each_layout_equals_one_process(spawn(train_pp, pp, 0, False, timeout=300), pp)


class ReturnsTuple(nn.Module):
    """Works in one process (the next layer unpacks it), but a cut cannot carry a tuple."""

    def forward(self, x):
        return x, x


class Unpack(nn.Module):
    def forward(self, pair):
        return pair[0]


class ToIndices(nn.Module):
    """An integer activation: no gradient can come back through it."""

    def forward(self, x):
        return x.argmax(-1)


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(CFG.vocab_size, CFG.vocab_size)  # token ids back to logits

    def forward(self, idx):
        return self.emb(idx)


def run_cut(layers_name):
    """pp=2 with a layer at the cut that returns what the pipeline cannot carry; each rank's error."""
    mesh = plait.make_mesh(dp=1, pp=2)
    gpt = build_gpt(CFG, seed=0)
    if layers_name == "tuple":
        layers, split = [gpt[0], gpt[1], ReturnsTuple(), Unpack(), *gpt[2:]], [3]
    else:
        layers, split = [*gpt, ToIndices(), Embed()], [len(gpt) + 1]
    engine = plait.Engine(layers, gpt_loss, mesh, microbatches=2, split=split)
    x, y = global_batch(0, 4)
    try:
        engine.train_step(x, y)
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.mark.parametrize("kind,returned", [("tuple", "a tuple"), ("int", "a int64 tensor (its gradient cannot come back)")])
def test_a_layer_a_cut_cannot_carry_is_named_on_the_first_step(kind, returned):
    ranks = spawn(run_cut, 2, kind, timeout=120)
    layer = 2 if kind == "tuple" else CFG.n_layer + 2
    assert ranks[0] == (f"PipelineCutError: layer {layer}, the last of stage 0 on rank 0 (dp=0, pp=0), returned "
                        f"{returned}; what crosses a pipeline cut must be one floating-point tensor: return one "
                        f"from that layer, or cut elsewhere (--split)")
    assert ranks[1] == ("PipelineCutError: stage 1 on rank 1 (dp=0, pp=1) has no input: stage 0 on rank 0 "
                        "(dp=0, pp=0) could not send its output (that rank's error says why)")
